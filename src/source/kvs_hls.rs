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
//!            decoder thread: appsrc → decodebin → videoconvert → videoscale → appsink
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

use super::{CommonOptions, common_setters};
use super::{Core, FrameStream, Frames, Pushed, Queue, SourceState, SourceStats, TaskGuard};
use crate::backoff::BackoffPolicy;
use crate::decode::{Decoder, DecoderDrop, FragmentInput, FrameSink};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::{FragmentId, Frame, PixelFormat};
use crate::hls::{self, MediaPlaylist, Segment, fmp4};
use crate::kvs::{KvsClient, StreamId};
use crate::metrics::FrameSourceMetrics;
use crate::source::{DeliveryPolicy, DropReason};

/// `PlaybackMode` of the HLS session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaybackMode {
    /// The live edge: the newest fragments as they are ingested (default).
    Live,
    /// From `start`, then live (fragments are added at real-time pace); ends at `end` if given.
    LiveReplay {
        /// First fragment start (inclusive).
        start: SystemTime,
        /// Last fragment start (inclusive), or open-ended.
        end: Option<SystemTime>,
    },
    /// An archived range; the iterator ends after its last frame. At most 24 h.
    OnDemand {
        /// First fragment start (inclusive).
        start: SystemTime,
        /// Last fragment start (inclusive).
        end: SystemTime,
    },
}

/// `FragmentSelectorType`: which clock timestamps and ranges refer to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimestampSelector {
    /// The camera's clock (default here; KVS's default is SERVER).
    #[default]
    Producer,
    /// KVS's ingest clock.
    Server,
}

/// `ContainerFormat` of the HLS fragments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Container {
    /// fMP4 (default, less overhead).
    #[default]
    FragmentedMp4,
    /// MPEG-TS (5–25 % more bytes). Not supported by the reader yet: `build()` refuses it.
    MpegTs,
}

/// `DiscontinuityMode` of the HLS session (the reader does not depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscontinuityMode {
    /// A discontinuity tag before every fragment.
    Always,
    /// None.
    Never,
    /// Where fragments have gaps or overlaps above 50 ms.
    OnDiscontinuity,
}

#[derive(Clone)]
enum ClientSource {
    Env { region: Option<String> },
    Config(Box<aws_config::SdkConfig>),
    Client(KvsClient),
}

/// Builder of a [`KvsHlsFrameSource`]; every option is validated by [`build`](Self::build).
#[derive(Clone)]
pub struct KvsHlsFrameSourceBuilder {
    stream: StreamId,
    client: ClientSource,
    playback: PlaybackMode,
    selector: TimestampSelector,
    container: Container,
    discontinuity: Option<DiscontinuityMode>,
    display_timestamps: bool,
    expires: Duration,
    max_playlist_fragments: Option<u32>,
    refresh_margin: Duration,
    poll_interval: Duration,
    request_timeout: Duration,
    stall_timeout: Duration,
    delivery: Option<DeliveryPolicy>,
    common: CommonOptions,
}

impl std::fmt::Debug for KvsHlsFrameSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvsHlsFrameSourceBuilder")
            .field("camera_id", &self.common.camera_id)
            .field("stream", &self.stream)
            .field("playback", &self.playback)
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

impl KvsHlsFrameSourceBuilder {
    fn new(camera_id: &str, stream: StreamId) -> Self {
        KvsHlsFrameSourceBuilder {
            stream,
            client: ClientSource::Env { region: None },
            playback: PlaybackMode::Live,
            selector: TimestampSelector::Producer,
            container: Container::FragmentedMp4,
            discontinuity: None,
            display_timestamps: true,
            expires: Duration::from_secs(3600),
            max_playlist_fragments: None,
            refresh_margin: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            delivery: None,
            common: CommonOptions::new(camera_id),
        }
    }

    /// AWS region (default: the configured one). Ignored with [`sdk_config`](Self::sdk_config)
    /// or [`client`](Self::client).
    #[must_use]
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.client = ClientSource::Env {
            region: Some(region.into()),
        };
        self
    }
    /// Use this AWS SDK configuration (credentials, region, endpoint) instead of the
    /// environment's, e.g. `Emulator::sdk_config()`.
    #[must_use]
    pub fn sdk_config(mut self, config: &aws_config::SdkConfig) -> Self {
        self.client = ClientSource::Config(Box::new(config.clone()));
        self
    }
    /// Share a [`KvsClient`] (and its endpoint cache) with other sources.
    #[must_use]
    pub fn client(mut self, client: KvsClient) -> Self {
        self.client = ClientSource::Client(client);
        self
    }
    setter!(
        /// Playback mode (default LIVE).
        playback: PlaybackMode
    );
    setter!(
        /// Fragment selector (default PRODUCER_TIMESTAMP).
        selector: TimestampSelector
    );
    setter!(
        /// Container format (default FRAGMENTED_MP4).
        container: Container
    );
    /// `DiscontinuityMode` (default: KVS's default for the selector).
    #[must_use]
    pub fn discontinuity_mode(mut self, mode: DiscontinuityMode) -> Self {
        self.discontinuity = Some(mode);
        self
    }
    setter!(
        /// `DisplayFragmentTimestamp=ALWAYS` (default true). Without it frames have no producer
        /// time, fragments cannot be matched across sessions, and the timestamp is the emit time.
        display_timestamps: bool
    );
    setter!(
        /// Session lifetime, `Expires`: 300 s–43200 s (default 3600 s).
        expires: Duration
    );
    /// `MaxMediaPlaylistFragmentResults`, 1–5000: how many fragments a playlist lists (default
    /// 30 for LIVE and LIVE_REPLAY, KVS's 1000 for ON_DEMAND).
    ///
    /// A LIVE playlist holds the newest N fragments, and fragments that leave it before they are
    /// fetched are lost (counted in `fragments_skipped`). KVS's default of 5 (10 s of 2 s
    /// fragments) is shorter than an ordinary recovery (quick retries, then a 5 s backoff ×
    /// 0.8–1.2, a new session); 30 (60 s of 2 s fragments, 30 s of 1 s ones) holds the quick
    /// retries and the first two backoff delays (≈ 2 + 6 + 12 s), so ordinary faults lose
    /// nothing, while costing 30 of the stream's 10,000 fragment-metadata points per poll (0.3 %
    /// at one poll a second). Latency does not grow: LIVE starts at the newest fragment.
    #[must_use]
    pub fn max_playlist_fragments(mut self, n: u32) -> Self {
        self.max_playlist_fragments = Some(n);
        self
    }
    setter!(
        /// A new session is opened this long before the current one expires (default 30 s;
        /// less than `expires`).
        refresh_margin: Duration
    );
    setter!(
        /// Media playlist poll period, 200 ms–10 s (default 1 s; KVS allows 5 playlist
        /// requests per second per session).
        poll_interval: Duration
    );
    setter!(
        /// Time limit of each playlist or fragment request, 1 s–120 s (default 10 s).
        request_timeout: Duration
    );
    setter!(
        /// Reconnect when no frame has been decoded for this long although the reader keeps up,
        /// 1 s–600 s (default 30 s).
        stall_timeout: Duration
    );
    /// Delivery policy (default: `DropOldest` for LIVE, `Block` for the others).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    common_setters!();

    fn validate(&self) -> Result<()> {
        self.common.validate()?;
        self.stream.validate()?;
        if !(Duration::from_secs(300)..=Duration::from_secs(43_200)).contains(&self.expires) {
            return Err(Error::invalid_config(
                "expires",
                format!("{:?}", self.expires),
                "must be between 300 s and 43200 s",
            ));
        }
        if self.refresh_margin >= self.expires {
            return Err(Error::invalid_config(
                "refresh_margin",
                format!("{:?}", self.refresh_margin),
                "must be less than `expires`",
            ));
        }
        if let Some(n) = self.max_playlist_fragments
            && !(1..=5000).contains(&n)
        {
            return Err(Error::invalid_config(
                "max_playlist_fragments",
                n,
                "must be between 1 and 5000",
            ));
        }
        let range = |start: SystemTime, end: SystemTime| -> Result<()> {
            match end.duration_since(start) {
                Ok(d) if !d.is_zero() && d <= Duration::from_secs(24 * 3600) => Ok(()),
                _ => Err(Error::invalid_config(
                    "playback",
                    format!("{:?}", self.playback),
                    "the range must end after it starts and last at most 24 h",
                )),
            }
        };
        match self.playback {
            PlaybackMode::Live => {}
            PlaybackMode::LiveReplay { start, end } => {
                if let Some(end) = end {
                    range(start, end)?;
                }
            }
            PlaybackMode::OnDemand { start, end } => range(start, end)?,
        }
        if self.container == Container::MpegTs {
            return Err(Error::invalid_config(
                "container",
                "MPEG_TS",
                "the reader supports FRAGMENTED_MP4 only for now",
            ));
        }
        let within = |name: &str, v: Duration, lo: Duration, hi: Duration| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid_config(
                    name,
                    format!("{v:?}"),
                    &format!("must be between {lo:?} and {hi:?}"),
                ))
            }
        };
        within(
            "poll_interval",
            self.poll_interval,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )?;
        within(
            "request_timeout",
            self.request_timeout,
            Duration::from_secs(1),
            Duration::from_secs(120),
        )?;
        within(
            "stall_timeout",
            self.stall_timeout,
            Duration::from_secs(1),
            Duration::from_secs(600),
        )?;
        Ok(())
    }

    /// Validates every option, builds the decode pipeline (a missing GStreamer plugin is
    /// reported here) and starts reading in the background.
    pub fn build(self) -> Result<KvsHlsFrameSource> {
        self.validate()?;
        self.common
            .require_elements(crate::decode::KVS_HEAD_ELEMENTS)?;
        let policy = self.delivery.unwrap_or(match self.playback {
            PlaybackMode::Live => DeliveryPolicy::DropOldest,
            _ => DeliveryPolicy::Block,
        });
        let core = Arc::new(
            Core::new(Queue::new(self.common.queue_capacity, policy))
                .counting_into(self.common.metrics.clone(), &self.common.camera_id),
        );
        let ctx = Arc::new(Ctx {
            camera_id: self.common.camera_id.clone(),
            core: Arc::clone(&core),
            metrics: self.common.metrics.clone(),
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
        let sink: Arc<dyn FrameSink> = Arc::new(Sink(Arc::clone(&ctx)));
        let decoder = Arc::new(Decoder::start(self.common.decode_config(), sink)?);
        let handle = self.common.runtime_handle()?;
        ctx.set_state(SourceState::Connecting);
        let task = handle.spawn(run(Arc::clone(&ctx), Arc::clone(&decoder), self));
        Ok(KvsHlsFrameSource {
            ctx,
            core,
            decoder,
            task: Mutex::new(Some(task)),
        })
    }
}

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

/// State shared by the source handle, its task and the decoder callbacks.
struct Ctx {
    camera_id: String,
    core: Arc<Core>,
    metrics: Option<FrameSourceMetrics>,
    stop: AtomicBool,
    stop_notify: Notify,
    sequence: AtomicU64,
    /// Last time a frame was decoded (or the watch was reset).
    last_progress: Mutex<Instant>,
    decode_failed: Mutex<Option<Error>>,
    /// Wakes the control task early (decode error).
    wake: Notify,
    /// Set by the stall watchdog when it fired: the error it caused is a stall.
    stalled: AtomicBool,
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

struct Sink(Arc<Ctx>);

impl FrameSink for Sink {
    fn frame(&self, mut frame: Frame) {
        let ctx = &self.0;
        ctx.reset_progress();
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
            m.frame(&ctx.camera_id, producer_time, age);
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

    fn error(&self, error: Error) {
        let ctx = &self.0;
        *ctx.decode_failed.lock() = Some(error);
        ctx.wake.notify_one();
    }
}

/// An open HLS session.
struct Session {
    number: u64,
    media_url: String,
    /// When it expires by this process's clock (requested + `Expires`).
    expires_at: Instant,
    /// Init segments by URL (URLs carry the session token, so this is per session).
    inits: std::collections::HashMap<String, Bytes>,
}

/// A fragment handed to the decoder.
#[derive(Clone, Copy, Debug)]
struct Fed {
    session: u64,
    sequence: u64,
    pdt: Option<SystemTime>,
    duration: Duration,
}

/// Where the reader is.
#[derive(Default)]
struct Position {
    /// The fragments fed most recently, oldest first (at most [`FED_HISTORY`]): a new session's
    /// playlist is matched against them.
    fed: VecDeque<Fed>,
    /// Where the next fragment starts on the decoder's timeline.
    cursor: Duration,
    /// Program date time at timeline 0 (the first fragment's).
    epoch: Option<SystemTime>,
    timescale: Option<u32>,
    /// The init segment the timescale was read from.
    init: Option<Bytes>,
    /// When the last fragment was fed.
    fed_at: Option<Instant>,
}

impl Position {
    fn last(&self) -> Option<Fed> {
        self.fed.back().copied()
    }

    fn fed_any(&self) -> bool {
        !self.fed.is_empty()
    }

    fn last_pdt(&self) -> Option<SystemTime> {
        self.fed.back().and_then(|f| f.pdt)
    }

    /// Indices in `fed` of the fragments with program date time `t` (± [`SAME_TIME`]).
    fn fed_at_time(&self, t: Option<SystemTime>) -> Vec<usize> {
        let Some(t) = t else {
            return Vec::new();
        };
        self.fed
            .iter()
            .enumerate()
            .filter(|(_, f)| f.pdt.is_some_and(|p| same_time(p, t)))
            .map(|(i, _)| i)
            .collect()
    }
}

/// The fragments of a playlist to feed, and what lies between them and the last one fed.
struct Selection {
    segments: Vec<Segment>,
    /// Whether the first of them directly follows the last fragment fed.
    contiguous: bool,
    /// Fragments that left the playlist window before they were fetched: how many, and the
    /// producer time they covered.
    skipped: Option<(u64, Option<Duration>)>,
}

impl Selection {
    /// A start with nothing to continue from: LIVE at the newest fragment (lowest latency),
    /// a range with everything listed.
    fn start(segments: &[Segment], live: bool) -> Selection {
        let segments = if live {
            segments.last().cloned().into_iter().collect()
        } else {
            segments.to_vec()
        };
        Selection {
            segments,
            contiguous: false,
            skipped: None,
        }
    }
}

struct Reader {
    ctx: Arc<Ctx>,
    decoder: Arc<Decoder>,
    opts: KvsHlsFrameSourceBuilder,
    client: KvsClient,
    http: reqwest::Client,
    session: Option<Session>,
    sessions_opened: u64,
    /// The next session replaces one that expires or was refused (a URL refresh).
    refresh_pending: bool,
    position: Position,
    failures: u32,
}

/// How long after a range's end its fragments are assumed to have all reached KVS (producers
/// upload within seconds; KVS answers LIVE with "no fragments" after 30 s without ingest).
const RANGE_SETTLE: Duration = Duration::from_secs(30);

/// `MaxMediaPlaylistFragmentResults` for LIVE and LIVE_REPLAY unless set (KVS's default is 5):
/// see [`KvsHlsFrameSourceBuilder::max_playlist_fragments`].
pub(crate) const LIVE_PLAYLIST_FRAGMENTS: u32 = 30;
/// KVS's default for ON_DEMAND.
const ON_DEMAND_PLAYLIST_FRAGMENTS: u32 = 1000;

/// Quick retries of a failed playlist, init or fragment GET inside the session, before the
/// error counts as an outage (backoff, then possibly a new session) …
const QUICK_RETRIES: u32 = 3;
/// … after 250 ms, 500 ms and 1 s.
const QUICK_RETRY_DELAY: Duration = Duration::from_millis(250);

/// Fragments remembered for matching a new session's playlist (more than a playlist holds).
const FED_HISTORY: usize = 64;

/// Program date times closer than this are the same fragment's (KVS gives milliseconds).
const SAME_TIME: Duration = Duration::from_millis(2);

/// Consecutive fragments whose program date times differ from "previous start + previous
/// duration" by more than this (backward; forward, beyond the wall time that passed) are a
/// step of the producer clock.
const CLOCK_STEP: Duration = Duration::from_secs(1);

/// A fragment may start this much before the end of the previous one on the decoder timeline
/// (rounded durations); further back (a producer clock that stepped back) it is placed at the
/// previous one's end instead, so that the timeline never goes backwards.
const TIMELINE_SLACK: Duration = Duration::from_millis(50);

/// A new session that is refused (403) this many times in a row without a fragment fed is an
/// outage (backoff), not a refresh.
const REFUSALS_BEFORE_BACKOFF: u32 = 2;

fn same_time(a: SystemTime, b: SystemTime) -> bool {
    a.duration_since(b)
        .or_else(|_| b.duration_since(a))
        .is_ok_and(|d| d <= SAME_TIME)
}

/// `to − from`, as (forward, magnitude).
fn signed_diff(from: SystemTime, to: SystemTime) -> (bool, Duration) {
    match to.duration_since(from) {
        Ok(d) => (true, d),
        Err(e) => (false, e.duration()),
    }
}

/// Requests worth retrying at once inside the session: the service or the network hiccuped.
fn quick_retryable(error: &Error) -> bool {
    matches!(
        error.kind(),
        ErrorKind::ServiceUnavailable
            | ErrorKind::Network
            | ErrorKind::Timeout
            | ErrorKind::Throttled
    )
}

enum Outcome {
    /// The range is complete (ON_DEMAND, or LIVE_REPLAY with an end).
    Finished,
}

async fn run(ctx: Arc<Ctx>, decoder: Arc<Decoder>, opts: KvsHlsFrameSourceBuilder) {
    // Whatever ends this task (a panic, a runtime shutdown), the iterator ends too.
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| {
        if !guard_ctx.stopped() {
            fail(&guard_ctx, e);
        }
    });
    let client = match &opts.client {
        ClientSource::Client(c) => Ok(c.clone()),
        ClientSource::Config(config) => Ok(KvsClient::new(config)),
        ClientSource::Env { region } => KvsClient::from_env(region.as_deref()).await,
    };
    let http = reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .build()
        .map_err(Error::from_reqwest);
    let (client, http) = match (client, http) {
        (Ok(c), Ok(h)) => (c, h),
        (Err(e), _) | (_, Err(e)) => {
            fail(&ctx, e);
            return;
        }
    };
    let mut reader = Reader {
        ctx: Arc::clone(&ctx),
        decoder,
        opts,
        client,
        http,
        session: None,
        sessions_opened: 0,
        refresh_pending: false,
        position: Position::default(),
        failures: 0,
    };
    reader.run().await;
}

fn fail(ctx: &Ctx, error: Error) {
    tracing::error!(camera = %ctx.camera_id, %error, "source failed");
    ctx.core.stats.lock().last_error = Some(error.to_string());
    ctx.set_state(SourceState::Error);
    ctx.core.queue.fail(error);
}

impl Reader {
    fn camera(&self) -> &str {
        &self.ctx.camera_id
    }

    fn session_number(&self) -> u64 {
        self.session.as_ref().map_or(0, |s| s.number)
    }

    /// `MaxMediaPlaylistFragmentResults` in effect.
    fn playlist_limit(&self) -> u32 {
        self.opts
            .max_playlist_fragments
            .unwrap_or(match self.opts.playback {
                PlaybackMode::OnDemand { .. } => ON_DEMAND_PLAYLIST_FRAGMENTS,
                PlaybackMode::Live | PlaybackMode::LiveReplay { .. } => LIVE_PLAYLIST_FRAGMENTS,
            })
    }

    async fn run(&mut self) {
        loop {
            if self.ctx.stopped() {
                return;
            }
            let result = self.follow().await;
            let error = match result {
                Ok(Outcome::Finished) => {
                    self.finish_range().await;
                    return;
                }
                Err(e) if e.kind() == ErrorKind::Stopped => return,
                Err(e) => e,
            };
            let stalled = self.ctx.stalled.swap(false, Ordering::SeqCst);
            let error = self.confirm_fatal(error).await;
            self.count_read_error(&error);
            if !error.is_transient() {
                fail(&self.ctx, error);
                return;
            }
            // A range wholly in the past cannot gain fragments: "no fragments" is its end.
            if error.kind() == ErrorKind::NoFragments && self.range_ended() {
                if self.position.fed_any() {
                    self.finish_range().await;
                } else {
                    fail(
                        &self.ctx,
                        error.context(format!(
                            "the requested range ended more than {}s ago and holds no fragments",
                            RANGE_SETTLE.as_secs()
                        )),
                    );
                }
                return;
            }
            self.failures += 1;
            {
                let mut stats = self.ctx.core.stats.lock();
                stats.consecutive_errors = self.failures;
                if stats.reconnecting_since.is_none() {
                    stats.reconnecting_since = Some(SystemTime::now());
                }
            }
            if self.opts.common.backoff.exhausted(self.failures) {
                let n = self.failures;
                fail(
                    &self.ctx,
                    error.context(format!("giving up after {n} consecutive errors")),
                );
                return;
            }
            // What the error says about the session and the data endpoint. A camera that is
            // offline, throttling or a stall leave both valid: the session is polled again
            // after the backoff (a new one would count against KVS's 5 per stream). Connection
            // errors and 5xx may mean a stale endpoint: both are replaced.
            let stale_endpoint = !stalled
                && matches!(
                    error.kind(),
                    ErrorKind::Network | ErrorKind::ServiceUnavailable | ErrorKind::Timeout
                );
            let keep_session =
                stalled || matches!(error.kind(), ErrorKind::NoFragments | ErrorKind::Throttled);
            if !keep_session {
                self.session = None;
            }
            if stale_endpoint {
                self.client
                    .invalidate_endpoint(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl);
            }
            let delay = self.opts.common.backoff.delay(self.failures);
            tracing::warn!(camera = %self.camera(), %error, ?delay, attempt = self.failures, keep_session, "reconnecting after backoff");
            self.ctx.set_state(SourceState::Reconnecting);
            {
                let mut stats = self.ctx.core.stats.lock();
                stats.reconnects += 1;
                stats.backoff_history.push(delay);
                if stats.backoff_history.len() > 32 {
                    stats.backoff_history.remove(0);
                }
            }
            if let Some(m) = &self.ctx.metrics {
                m.reconnect(self.camera());
            }
            if self.ctx.sleep(delay).await.is_err() {
                return;
            }
            self.ctx.reset_progress();
        }
    }

    /// Counts a failed request, stall or decode error.
    fn count_read_error(&self, error: &Error) {
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.read_errors += 1;
            stats.last_error = Some(error.to_string());
        }
        if let Some(m) = &self.ctx.metrics {
            m.read_error(self.camera());
        }
    }

    /// Flushes the decoder (its last frames), then ends the queue: the end of a range.
    async fn finish_range(&self) {
        tracing::info!(camera = %self.camera(), "end of the requested range");
        if let Err(e) = self.decoder.finish().await {
            tracing::debug!(camera = %self.camera(), error = %e, "decoder finish");
        }
        // The last fragments failed to decode: their frames are lost, which is counted.
        self.take_decode_failure();
        // The state first: a reader that sees the end sees why.
        self.ctx.set_state(SourceState::Disconnected);
        self.ctx.core.queue.finish();
    }

    /// Counts a decode error, if the decoder reported one. The session stays: the decoder
    /// rebuilds its pipeline before the next fragment and sends it the init segment again.
    fn take_decode_failure(&self) {
        let failed = self.ctx.decode_failed.lock().take();
        let Some(error) = failed else {
            return;
        };
        tracing::warn!(camera = %self.camera(), %error, "decode error: the frames of the fragments in the decoder are lost; the pipeline is rebuilt");
        self.ctx.core.stats.lock().decode_errors += 1;
        self.count_read_error(&error);
    }

    /// Whether the requested range (ON_DEMAND, or LIVE_REPLAY with an end) ended more than
    /// [`RANGE_SETTLE`] ago, so that no fragment can still arrive in it.
    fn range_ended(&self) -> bool {
        let end = match self.opts.playback {
            PlaybackMode::OnDemand { end, .. }
            | PlaybackMode::LiveReplay { end: Some(end), .. } => end,
            PlaybackMode::Live | PlaybackMode::LiveReplay { end: None, .. } => return false,
        };
        end.checked_add(RANGE_SETTLE)
            .is_some_and(|settled| settled < SystemTime::now())
    }

    /// Where a new session of a range starts: the range's start, or just after the last
    /// fragment fed (KVS ranges are inclusive, at millisecond precision), so that a continuation
    /// always advances.
    fn range_start(&self, start: SystemTime) -> SystemTime {
        match self
            .position
            .last_pdt()
            .and_then(|t| t.checked_add(Duration::from_millis(1)))
        {
            Some(next) if next > start => next,
            _ => start,
        }
    }

    /// A 404 that looks like "stream not found" is confirmed with DescribeStream before the
    /// source gives up (KVS also answers 404 when a camera is merely offline).
    async fn confirm_fatal(&self, error: Error) -> Error {
        if error.kind() != ErrorKind::StreamNotFound {
            return error;
        }
        let mut request = self.client.control().describe_stream();
        request = match &self.opts.stream {
            StreamId::Name(n) => request.stream_name(n),
            StreamId::Arn(a) => request.stream_arn(a),
        };
        match request.send().await {
            Err(e) => {
                let e = Error::from_sdk("DescribeStream", e);
                if e.kind() == ErrorKind::StreamNotFound {
                    e.context(format!("stream {} is gone", self.opts.stream))
                } else {
                    Error::new(
                        ErrorKind::NoFragments,
                        format!("{error} (DescribeStream: {e})"),
                    )
                }
            }
            Ok(_) => Error::new(
                ErrorKind::NoFragments,
                format!("{error} (the stream exists: retrying)"),
            ),
        }
    }

    /// Opens a session (a URL refresh when `refresh_pending`); the previous one, if any, is
    /// replaced only once the new one works.
    async fn open_session(&mut self) -> Result<()> {
        let refresh = self.refresh_pending;
        let media = self
            .client
            .archived_media(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl)
            .await?;
        let mut selector =
            am::HlsFragmentSelector::builder().fragment_selector_type(match self.opts.selector {
                TimestampSelector::Producer => am::HlsFragmentSelectorType::ProducerTimestamp,
                TimestampSelector::Server => am::HlsFragmentSelectorType::ServerTimestamp,
            });
        let (mode, range) = match self.opts.playback {
            PlaybackMode::Live => (am::HlsPlaybackMode::Live, None),
            PlaybackMode::LiveReplay { start, end } => {
                (am::HlsPlaybackMode::LiveReplay, Some((start, end)))
            }
            PlaybackMode::OnDemand { start, end } => {
                (am::HlsPlaybackMode::OnDemand, Some((start, Some(end))))
            }
        };
        if let Some((start, end)) = range {
            // After a reconnect or at a continuation, resume after the last fragment fed.
            let start = self.range_start(start);
            if end.is_some_and(|end| start > end) {
                return Err(Error::new(
                    ErrorKind::NoFragments,
                    "every fragment of the requested range was read",
                ));
            }
            let mut r = am::HlsTimestampRange::builder().start_timestamp(start.into());
            if let Some(end) = end {
                r = r.end_timestamp(end.into());
            }
            selector = selector.timestamp_range(r.build());
        }
        let mut request = media
            .get_hls_streaming_session_url()
            .playback_mode(mode)
            .hls_fragment_selector(selector.build())
            .container_format(am::ContainerFormat::FragmentedMp4)
            .display_fragment_timestamp(if self.opts.display_timestamps {
                am::HlsDisplayFragmentTimestamp::Always
            } else {
                am::HlsDisplayFragmentTimestamp::Never
            })
            .expires(i32::try_from(self.opts.expires.as_secs()).unwrap_or(43_200))
            .max_media_playlist_fragment_results(i64::from(self.playlist_limit()));
        request = match &self.opts.stream {
            StreamId::Name(n) => request.stream_name(n),
            StreamId::Arn(a) => request.stream_arn(a),
        };
        if let Some(mode) = self.opts.discontinuity {
            request = request.discontinuity_mode(match mode {
                DiscontinuityMode::Always => am::HlsDiscontinuityMode::Always,
                DiscontinuityMode::Never => am::HlsDiscontinuityMode::Never,
                DiscontinuityMode::OnDiscontinuity => am::HlsDiscontinuityMode::OnDiscontinuity,
            });
        }
        let requested = Instant::now();
        let output = match request.send().await {
            Ok(o) => o,
            Err(e) => {
                let error = Error::from_sdk("GetHLSStreamingSessionURL", e).context(format!(
                    "camera {}, stream {}",
                    self.camera(),
                    self.opts.stream
                ));
                // Only a failure that may come from a stale endpoint reloads it (GetDataEndpoint
                // has a quota of 5 TPS per stream): not "no fragments", not throttling.
                if matches!(
                    error.kind(),
                    ErrorKind::Network | ErrorKind::ServiceUnavailable | ErrorKind::Timeout
                ) {
                    self.client
                        .invalidate_endpoint(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl);
                }
                return Err(error);
            }
        };
        let master_url = output
            .hls_streaming_session_url()
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "GetHLSStreamingSessionURL returned no URL",
                )
            })?
            .to_owned();
        let master = self.get_retrying(&master_url, "master playlist").await?;
        let media_url = hls::media_playlist_url(&master_url, &master)?;
        self.sessions_opened += 1;
        self.session = Some(Session {
            number: self.sessions_opened,
            media_url,
            expires_at: requested + self.opts.expires,
            inits: std::collections::HashMap::new(),
        });
        self.refresh_pending = false;
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.sessions += 1;
            if refresh {
                stats.url_refreshes += 1;
            }
        }
        if refresh && let Some(m) = &self.ctx.metrics {
            m.url_refresh(self.camera());
        }
        tracing::debug!(camera = %self.camera(), session = self.sessions_opened, refresh, "HLS session opened");
        Ok(())
    }

    /// GET with the request timeout and the stall watchdog; HTTP errors classified.
    async fn get(&self, url: &str) -> Result<Bytes> {
        let fetch = async {
            let response = self
                .http
                .get(url)
                .timeout(self.opts.request_timeout)
                .send()
                .await
                .map_err(Error::from_reqwest)?;
            let status = response.status();
            if !status.is_success() {
                let error_type = response
                    .headers()
                    .get("x-amzn-ErrorType")
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned);
                let body = response.bytes().await.unwrap_or_default();
                return Err(Error::from_hls_response(
                    status.as_u16(),
                    error_type.as_deref(),
                    &body,
                ));
            }
            response.bytes().await.map_err(Error::from_reqwest)
        };
        tokio::select! {
            r = fetch => r,
            e = self.watchdog() => Err(e),
            _ = self.ctx.stop_notify.notified() => Err(stopped()),
        }
    }

    /// [`get`](Self::get), retried quickly inside the session ([`QUICK_RETRIES`]) when the
    /// service or the network hiccuped; each failed attempt is a read error.
    async fn get_retrying(&self, url: &str, what: &str) -> Result<Bytes> {
        let mut attempt = 0;
        loop {
            let error = match self.get(url).await {
                Ok(body) => return Ok(body),
                Err(e) => e,
            };
            if attempt >= QUICK_RETRIES
                || !quick_retryable(&error)
                || self.ctx.stalled.load(Ordering::SeqCst)
            {
                return Err(error);
            }
            attempt += 1;
            self.count_read_error(&error);
            let delay = QUICK_RETRY_DELAY * 2u32.pow(attempt - 1);
            tracing::info!(camera = %self.camera(), what, attempt, %error, ?delay, "request failed: retrying in the session");
            self.ctx.sleep(delay).await?;
        }
    }

    /// Resolves when no frame has been decoded for `stall_timeout` while the reader keeps up
    /// (and marks the error as a stall).
    async fn watchdog(&self) -> Error {
        loop {
            let idle = self.ctx.last_progress.lock().elapsed();
            if self.position.fed_any()
                && idle > self.opts.stall_timeout
                && !self.ctx.core.queue.is_full()
            {
                self.ctx.reset_progress();
                self.ctx.stalled.store(true, Ordering::SeqCst);
                return Error::new(
                    ErrorKind::Timeout,
                    format!("no frame decoded for {:?} (stall)", self.opts.stall_timeout),
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn session_expiring(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| Instant::now() + self.opts.refresh_margin >= s.expires_at)
    }

    /// A 403 on a playlist, init or fragment GET: the token expired, was revoked, or KVS closed
    /// the session because a sixth one of the stream was created. The session is replaced at
    /// once (a refresh); refused again and again without progress, it is an outage.
    fn session_refused(&mut self, error: Error, refusals: &mut u32) -> Result<()> {
        *refusals += 1;
        if *refusals > REFUSALS_BEFORE_BACKOFF {
            return Err(error);
        }
        let early = self
            .session
            .as_ref()
            .is_some_and(|s| Instant::now() + self.opts.refresh_margin < s.expires_at);
        if early {
            // Not our expiry: revoked, or closed by another reader's session.
            self.ctx.core.stats.lock().sessions_lost += 1;
            if let Some(m) = &self.ctx.metrics {
                m.session_lost(self.camera());
            }
        }
        tracing::info!(camera = %self.camera(), %error, early, "session refused: refreshing");
        self.session = None;
        self.refresh_pending = true;
        Ok(())
    }

    /// Follows the playlist until an error (or the end of a range).
    async fn follow(&mut self) -> Result<Outcome> {
        let mut refusals = 0;
        loop {
            if self.ctx.stopped() {
                return Err(stopped());
            }
            self.take_decode_failure();
            if self.session.is_none() {
                self.open_session().await?;
            } else if self.session_expiring() {
                tracing::info!(camera = %self.camera(), "session expiring: refreshing");
                self.refresh_pending = true;
                self.open_session().await?;
            }
            let playlist = match self.poll().await {
                Ok(p) => p,
                Err(e) if e.kind() == ErrorKind::SessionExpired => {
                    self.session_refused(e, &mut refusals)?;
                    continue;
                }
                Err(e) => return Err(e),
            };
            self.ctx.set_state(SourceState::Connected);
            let selection = self.select(&playlist);
            if let Some((count, gap)) = selection.skipped {
                self.count_skipped(count, gap);
            }
            let mut contiguous = selection.contiguous;
            let mut refused = false;
            for segment in &selection.segments {
                match self.feed(segment, contiguous).await {
                    Ok(()) => {}
                    Err(e) if e.kind() == ErrorKind::SessionExpired => {
                        self.session_refused(e, &mut refusals)?;
                        refused = true;
                        break;
                    }
                    Err(e) => return Err(e),
                }
                contiguous = true;
                refusals = 0;
                self.failures = 0;
                {
                    let mut stats = self.ctx.core.stats.lock();
                    stats.consecutive_errors = 0;
                    stats.reconnecting_since = None;
                }
                self.take_decode_failure();
            }
            if refused {
                continue;
            }
            if playlist.end_list
                && !matches!(self.opts.playback, PlaybackMode::Live)
                && self.read_to_the_end(&playlist)
            {
                // A playlist holds at most MaxMediaPlaylistFragmentResults fragments: a full
                // one may not reach the end of the range, so continue in a new session that
                // starts just after the last fragment fed.
                let full = playlist.segments.len() >= self.playlist_limit() as usize;
                if !(full && self.position.last_pdt().is_some()) {
                    return Ok(Outcome::Finished);
                }
                tracing::debug!(camera = %self.camera(), "range continues in a new session");
                match self.open_session().await {
                    Ok(()) => continue,
                    Err(e) if e.kind() == ErrorKind::NoFragments => return Ok(Outcome::Finished),
                    Err(e) => return Err(e),
                }
            }
            let pause = self.opts.poll_interval;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                e = self.watchdog() => return Err(e),
                _ = self.ctx.wake.notified() => {}
                _ = self.ctx.stop_notify.notified() => return Err(stopped()),
            }
        }
    }

    /// Whether every fragment of this session's (complete) playlist was fed.
    fn read_to_the_end(&self, playlist: &MediaPlaylist) -> bool {
        let Some(listed) = playlist.segments.last() else {
            return true;
        };
        self.position
            .last()
            .is_some_and(|f| f.session == self.session_number() && f.sequence >= listed.sequence)
    }

    async fn poll(&mut self) -> Result<MediaPlaylist> {
        let url = self
            .session
            .as_ref()
            .map(|s| s.media_url.clone())
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no session"))?;
        let text = self.get_retrying(&url, "media playlist").await?;
        self.ctx.core.stats.lock().playlist_polls += 1;
        hls::parse_media_playlist(&url, &text)
    }

    /// Counts fragments that left the playlist window before they were fetched.
    fn count_skipped(&self, count: u64, gap: Option<Duration>) {
        tracing::warn!(
            camera = %self.camera(),
            fragments = count,
            gap = ?gap,
            "fragments left the playlist window before they were fetched: skipped"
        );
        self.ctx.core.stats.lock().fragments_skipped += count;
        if let Some(m) = &self.ctx.metrics {
            m.fragments_skipped(self.camera(), count);
        }
    }

    /// The fragments of `playlist` not yet fed, in order.
    ///
    /// Inside a session the media sequence decides, whatever the program date times do (a
    /// producer clock may step either way). In a new session the newest listed fragment that
    /// was fed already is found by its program date time (the fragment listed before it must
    /// not be a fed fragment from elsewhere, which tells apart the same time before and after a
    /// clock step); everything after it is new.
    fn select(&self, playlist: &MediaPlaylist) -> Selection {
        let segments = &playlist.segments;
        let live = matches!(self.opts.playback, PlaybackMode::Live);
        let Some(last) = self.position.last() else {
            // The first fragment ever: LIVE starts at the newest (lowest latency).
            return Selection::start(segments, live);
        };
        if last.session == self.session_number() {
            let fresh: Vec<Segment> = segments
                .iter()
                .filter(|s| s.sequence > last.sequence)
                .cloned()
                .collect();
            let skipped = fresh.first().and_then(|first| {
                let missing = first.sequence.checked_sub(last.sequence)?.checked_sub(1)?;
                (missing > 0).then(|| (missing, gap_after(&last, first)))
            });
            return Selection {
                contiguous: skipped.is_none(),
                segments: fresh,
                skipped,
            };
        }
        if let Some(i) = self.newest_fed(segments) {
            return Selection {
                segments: segments.get(i + 1..).unwrap_or_default().to_vec(),
                contiguous: true,
                skipped: None,
            };
        }
        // None of the listed fragments was fed.
        let timed = last.pdt.is_some() && segments.iter().all(|s| s.program_date_time.is_some());
        if !timed {
            // Without program date times fragments cannot be matched across sessions: LIVE
            // goes on at the newest fragment, a range with everything listed.
            return Selection::start(segments, live);
        }
        // LIVE: the window moved past the last fragment fed (a range continues after it).
        let gap = segments.first().and_then(|first| gap_after(&last, first));
        let skipped = gap.filter(|g| live && *g > CLOCK_STEP).map(|g| {
            let each = last.duration.max(Duration::from_millis(100));
            let n = (g.as_secs_f64() / each.as_secs_f64()).round();
            (if n >= 1.0 { n as u64 } else { 1 }, Some(g))
        });
        Selection {
            segments: segments.clone(),
            contiguous: gap.is_some_and(|g| g <= CLOCK_STEP),
            skipped,
        }
    }

    /// The index of the newest listed fragment that was fed already, matched by program date
    /// time.
    fn newest_fed(&self, segments: &[Segment]) -> Option<usize> {
        (0..segments.len()).rev().find(|&i| {
            let at = self.position.fed_at_time(segments[i].program_date_time);
            if at.is_empty() {
                return false;
            }
            let Some(before) = i.checked_sub(1).and_then(|b| segments.get(b)) else {
                return true;
            };
            let before_at = self.position.fed_at_time(before.program_date_time);
            // The fragment before is not a fed one (a gap), or it is the one fed just before.
            before_at.is_empty()
                || at
                    .iter()
                    .any(|j| j.checked_sub(1).is_some_and(|p| before_at.contains(&p)))
        })
    }

    /// Notes a step of the producer clock between the last fragment fed and `segment`, which
    /// directly follows it.
    fn note_clock_step(&self, segment: &Segment) {
        let Some(last) = self.position.last() else {
            return;
        };
        let (Some(prev), Some(now)) = (last.pdt, segment.program_date_time) else {
            return;
        };
        let Some(expected) = prev.checked_add(last.duration) else {
            return;
        };
        let (forward, size) = signed_diff(expected, now);
        let step = if forward {
            // A gap forward is a camera outage when as much wall time passed (LIVE only: an
            // archive read at full speed has no wall time to compare with).
            let waited = self.position.fed_at.map_or(Duration::ZERO, |t| t.elapsed());
            matches!(self.opts.playback, PlaybackMode::Live) && size > CLOCK_STEP + waited
        } else {
            size > CLOCK_STEP
        };
        if step {
            tracing::warn!(
                camera = %self.camera(),
                direction = if forward { "forward" } else { "back" },
                step = ?size,
                "the producer clock stepped: following the media sequence"
            );
            self.ctx.core.stats.lock().clock_steps += 1;
            if let Some(m) = &self.ctx.metrics {
                m.clock_step(self.camera());
            }
        }
    }

    async fn feed(&mut self, segment: &Segment, contiguous: bool) -> Result<()> {
        let init = match &segment.map_url {
            Some(url) => Some(self.init(url).await?),
            None => None,
        };
        match &init {
            // A new codec configuration may bring a new timescale: parse each init once.
            Some(init) if self.position.init.as_ref() != Some(init) => {
                self.position.timescale = Some(fmp4::init_timescale(init)?);
                self.position.init = Some(init.clone());
            }
            Some(_) => {}
            None if self.position.timescale.is_none() => {
                return Err(Error::new(
                    ErrorKind::UnsupportedMedia,
                    "the playlist has no EXT-X-MAP (fMP4 init segment)",
                ));
            }
            None => {}
        }
        let started = Instant::now();
        let data = self.get_retrying(&segment.url, "media fragment").await?;
        let fetch = started.elapsed();
        if contiguous {
            self.note_clock_step(segment);
        }
        let mut data = data.to_vec();
        // The decoder's timeline: program date time − the first one, which keeps gaps and makes
        // producer time = first program date time + PTS; but never backwards (a producer clock
        // that stepped back): then right after the previous fragment.
        let natural = match (segment.program_date_time, self.position.epoch) {
            (Some(pdt), Some(epoch)) => pdt.duration_since(epoch).ok(),
            (Some(pdt), None) => {
                self.position.epoch = Some(pdt);
                self.decoder.set_epoch(pdt);
                Some(Duration::ZERO)
            }
            (None, _) => None,
        };
        let start = match natural {
            Some(n) if n + TIMELINE_SLACK >= self.position.cursor => n,
            _ => self.position.cursor,
        };
        let timescale = u128::from(self.position.timescale.unwrap_or(90_000));
        let ticks = u64::try_from(start.as_nanos() * timescale / 1_000_000_000).map_err(|_| {
            Error::new(
                ErrorKind::Protocol,
                format!("a fragment starts {start:?} into the stream: beyond the decode timeline"),
            )
        })?;
        fmp4::rebase(&mut data, ticks)?;
        self.position.cursor = start.checked_add(segment.duration).unwrap_or(start);
        let bytes = data.len();
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.fragments_fetched += 1;
            stats.bytes_fetched += bytes as u64;
        }
        if let Some(m) = &self.ctx.metrics {
            m.fragment(self.camera(), bytes, fetch);
        }
        let session = self.session_number();
        if !self.position.fed_any() {
            self.ctx.reset_progress();
        }
        self.decoder
            .push(FragmentInput {
                init,
                data: Bytes::from(data),
                start,
                id: FragmentId {
                    program_date_time: segment.program_date_time,
                    media_sequence: segment.sequence,
                    session,
                },
            })
            .await?;
        self.position.fed.push_back(Fed {
            session,
            sequence: segment.sequence,
            pdt: segment.program_date_time,
            duration: segment.duration,
        });
        while self.position.fed.len() > FED_HISTORY {
            self.position.fed.pop_front();
        }
        self.position.fed_at = Some(Instant::now());
        Ok(())
    }

    async fn init(&mut self, url: &str) -> Result<Bytes> {
        if let Some(b) = self.session.as_ref().and_then(|s| s.inits.get(url)) {
            return Ok(b.clone());
        }
        let bytes = self.get_retrying(url, "init segment").await?;
        self.ctx.core.stats.lock().bytes_fetched += bytes.len() as u64;
        if let Some(m) = &self.ctx.metrics {
            m.init_segment(self.camera(), bytes.len());
        }
        if let Some(s) = self.session.as_mut() {
            s.inits.insert(url.to_owned(), bytes.clone());
        }
        Ok(bytes)
    }
}

/// The producer time between the end of fragment `last` and the start of `next`, if `next`
/// starts later.
fn gap_after(last: &Fed, next: &Segment) -> Option<Duration> {
    let end = last.pdt?.checked_add(last.duration)?;
    next.program_date_time?.duration_since(end).ok()
}
