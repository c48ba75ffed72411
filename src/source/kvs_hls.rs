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
    /// `MaxMediaPlaylistFragmentResults`, 1–5000 (default: KVS's, 5 for LIVE/LIVE_REPLAY, 1000
    /// for ON_DEMAND; AWS recommends 3–10 for live).
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
        self.ctx.stop_notify.notify_waiters();
        self.core.queue.close();
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
    expires_at: Instant,
    /// Init segments by URL (URLs carry the session token, so this is per session).
    inits: std::collections::HashMap<String, Bytes>,
}

/// Where the reader is: the last fragment handed to the decoder.
#[derive(Default)]
struct Position {
    last_pdt: Option<SystemTime>,
    last_sequence: Option<(u64, u64)>,
    /// Timeline without program date times: sum of durations so far.
    cursor: Duration,
    epoch: Option<SystemTime>,
    timescale: Option<u32>,
    /// The init segment the timescale was read from.
    init: Option<Bytes>,
    fed_any: bool,
}

struct Reader {
    ctx: Arc<Ctx>,
    decoder: Arc<Decoder>,
    opts: KvsHlsFrameSourceBuilder,
    client: KvsClient,
    http: reqwest::Client,
    session: Option<Session>,
    sessions_opened: u64,
    position: Position,
    failures: u32,
}

/// How long after a range's end its fragments are assumed to have all reached KVS (producers
/// upload within seconds; KVS answers LIVE with "no fragments" after 30 s without ingest).
const RANGE_SETTLE: Duration = Duration::from_secs(30);

enum Outcome {
    /// The range is complete (ON_DEMAND, or LIVE_REPLAY with an end).
    Finished,
}

async fn run(ctx: Arc<Ctx>, decoder: Arc<Decoder>, opts: KvsHlsFrameSourceBuilder) {
    // Whatever ends this task (a panic, a runtime shutdown), the iterator ends too.
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| fail(&guard_ctx, e));
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
            let error = self.confirm_fatal(error).await;
            {
                let mut stats = self.ctx.core.stats.lock();
                stats.read_errors += 1;
                stats.last_error = Some(error.to_string());
            }
            if let Some(m) = &self.ctx.metrics {
                m.read_error(self.camera());
            }
            if !error.is_transient() {
                fail(&self.ctx, error);
                return;
            }
            // A range wholly in the past cannot gain fragments: "no fragments" is its end.
            if error.kind() == ErrorKind::NoFragments && self.range_ended() {
                if self.position.fed_any {
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
            let delay = self.opts.common.backoff.delay(self.failures);
            tracing::warn!(camera = %self.camera(), %error, ?delay, attempt = self.failures, "reconnecting after backoff");
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
            self.session = None;
            self.client
                .invalidate_endpoint(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl);
            if self.ctx.sleep(delay).await.is_err() {
                return;
            }
            self.ctx.reset_progress();
        }
    }

    /// Flushes the decoder (its last frames), then ends the queue: the end of a range.
    async fn finish_range(&self) {
        tracing::info!(camera = %self.camera(), "end of the requested range");
        if let Err(e) = self.decoder.finish().await {
            tracing::debug!(camera = %self.camera(), error = %e, "decoder finish");
        }
        // The last fragments failed to decode: their frames are lost, which is counted.
        let failed = self.ctx.decode_failed.lock().take();
        if let Some(error) = failed {
            self.count_decode_error(&error);
        }
        // The state first: a reader that sees the end sees why.
        self.ctx.set_state(SourceState::Disconnected);
        self.ctx.core.queue.finish();
    }

    /// Counts a decode error (the decoder rebuilds its pipeline before the next fragment).
    fn count_decode_error(&self, error: &Error) {
        tracing::warn!(camera = %self.camera(), %error, "decode error: the frames of the fragments in the decoder are lost");
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.decode_errors += 1;
            stats.read_errors += 1;
            stats.last_error = Some(error.to_string());
        }
        if let Some(m) = &self.ctx.metrics {
            m.read_error(self.camera());
        }
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

    async fn open_session(&mut self, refresh: bool) -> Result<()> {
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
            // After a reconnect, resume after the last fragment fed (the range start moves up).
            let start = match self.position.last_pdt {
                Some(pdt) if pdt > start => pdt,
                _ => start,
            };
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
            .expires(self.opts.expires.as_secs() as i32);
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
        if let Some(n) = self.opts.max_playlist_fragments {
            request = request.max_media_playlist_fragment_results(i64::from(n));
        }
        let requested = Instant::now();
        let output = match request.send().await {
            Ok(o) => o,
            Err(e) => {
                self.client
                    .invalidate_endpoint(&self.opts.stream, ApiName::GetHlsStreamingSessionUrl);
                return Err(
                    Error::from_sdk("GetHLSStreamingSessionURL", e).context(format!(
                        "camera {}, stream {}",
                        self.camera(),
                        self.opts.stream
                    )),
                );
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
        let master = self.get(&master_url).await?;
        let media_url = hls::media_playlist_url(&master_url, &master)?;
        self.sessions_opened += 1;
        self.session = Some(Session {
            number: self.sessions_opened,
            media_url,
            expires_at: requested + self.opts.expires,
            inits: std::collections::HashMap::new(),
        });
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

    /// Resolves when no frame has been decoded for `stall_timeout` while the reader keeps up,
    /// or when the decoder failed.
    async fn watchdog(&self) -> Error {
        loop {
            if let Some(e) = self.ctx.decode_failed.lock().take() {
                return e;
            }
            let idle = self.ctx.last_progress.lock().elapsed();
            if self.position.fed_any
                && idle > self.opts.stall_timeout
                && !self.ctx.core.queue.is_full()
            {
                self.ctx.reset_progress();
                return Error::new(
                    ErrorKind::Timeout,
                    format!("no frame decoded for {:?} (stall)", self.opts.stall_timeout),
                );
            }
            tokio::select! {
                _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                _ = self.ctx.wake.notified() => {}
            }
        }
    }

    fn session_expiring(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| Instant::now() + self.opts.refresh_margin >= s.expires_at)
    }

    /// Follows the playlist until an error (or the end of a range).
    async fn follow(&mut self) -> Result<Outcome> {
        if self.session.is_none() {
            self.open_session(false).await?;
        }
        loop {
            if self.ctx.stopped() {
                return Err(stopped());
            }
            if let Some(e) = self.ctx.decode_failed.lock().take() {
                self.ctx.core.stats.lock().decode_errors += 1;
                return Err(e);
            }
            if self.session_expiring() {
                tracing::info!(camera = %self.camera(), "session expiring: refreshing");
                self.open_session(true).await?;
            }
            let playlist = match self.poll().await {
                Ok(p) => p,
                Err(e) if e.kind() == ErrorKind::SessionExpired => {
                    tracing::info!(camera = %self.camera(), error = %e, "session refused: refreshing");
                    self.open_session(true).await?;
                    self.poll().await?
                }
                Err(e) => return Err(e),
            };
            self.ctx.set_state(SourceState::Connected);
            let fresh = self.select(&playlist);
            for segment in fresh {
                self.feed(&segment).await?;
                self.failures = 0;
                {
                    let mut stats = self.ctx.core.stats.lock();
                    stats.consecutive_errors = 0;
                    stats.reconnecting_since = None;
                }
            }
            if playlist.end_list && !matches!(self.opts.playback, PlaybackMode::Live) {
                let last = playlist.segments.last();
                let done = match (last, self.position.last_pdt) {
                    (None, _) => true,
                    (Some(s), Some(pdt)) => s.program_date_time.is_none_or(|t| t <= pdt),
                    (Some(s), None) => self.position.last_sequence.is_some_and(|(session, seq)| {
                        Some(session) == self.session.as_ref().map(|x| x.number)
                            && seq >= s.sequence
                    }),
                };
                if done {
                    // A playlist holds at most MaxMediaPlaylistFragmentResults fragments: a full
                    // one may not reach the end of the range, so continue in a new session
                    // that starts at the last fragment fed.
                    let limit = self.opts.max_playlist_fragments.map_or(
                        if matches!(self.opts.playback, PlaybackMode::OnDemand { .. }) {
                            1000
                        } else {
                            5
                        },
                        |n| n as usize,
                    );
                    if playlist.segments.len() >= limit && self.position.last_pdt.is_some() {
                        self.open_session(false).await?;
                        continue;
                    }
                    return Ok(Outcome::Finished);
                }
            }
            let pause = self.opts.poll_interval;
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                e = self.watchdog() => return Err(e),
                _ = self.ctx.stop_notify.notified() => return Err(stopped()),
            }
        }
    }

    async fn poll(&mut self) -> Result<MediaPlaylist> {
        let url = self
            .session
            .as_ref()
            .map(|s| s.media_url.clone())
            .ok_or_else(|| Error::new(ErrorKind::Internal, "no session"))?;
        let text = self.get(&url).await?;
        self.ctx.core.stats.lock().playlist_polls += 1;
        hls::parse_media_playlist(&url, &text)
    }

    /// The fragments of `playlist` not yet fed, in order.
    fn select(&self, playlist: &MediaPlaylist) -> Vec<Segment> {
        let session = self.session.as_ref().map_or(0, |s| s.number);
        let segments = &playlist.segments;
        if let Some(last) = self.position.last_pdt {
            // Across sessions: by program date time.
            return segments
                .iter()
                .filter(|s| s.program_date_time.is_some_and(|t| t > last))
                .cloned()
                .collect();
        }
        match self.position.last_sequence {
            Some((s, seq)) if s == session => segments
                .iter()
                .filter(|x| x.sequence > seq)
                .cloned()
                .collect(),
            // First fragment ever, or a new session without program date times.
            _ => match self.opts.playback {
                // Live: start at the newest fragment (lowest latency).
                PlaybackMode::Live => segments.last().cloned().into_iter().collect(),
                _ => segments.clone(),
            },
        }
    }

    async fn feed(&mut self, segment: &Segment) -> Result<()> {
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
        let data = self.get(&segment.url).await?;
        let fetch = started.elapsed();
        let mut data = data.to_vec();
        let start = match (segment.program_date_time, self.position.epoch) {
            (Some(pdt), Some(epoch)) => pdt.duration_since(epoch).unwrap_or(Duration::ZERO),
            (Some(pdt), None) => {
                self.position.epoch = Some(pdt);
                self.decoder.set_epoch(pdt);
                Duration::ZERO
            }
            (None, _) => self.position.cursor,
        };
        let timescale = u64::from(self.position.timescale.unwrap_or(90_000));
        let ticks = (start.as_nanos() * u128::from(timescale) / 1_000_000_000) as u64;
        fmp4::rebase(&mut data, ticks)?;
        self.position.cursor = start + segment.duration;
        let bytes = data.len();
        {
            let mut stats = self.ctx.core.stats.lock();
            stats.fragments_fetched += 1;
            stats.bytes_fetched += bytes as u64;
        }
        if let Some(m) = &self.ctx.metrics {
            m.fragment(self.camera(), bytes, fetch);
        }
        let session = self.session.as_ref().map_or(0, |s| s.number);
        if !self.position.fed_any {
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
        self.position.fed_any = true;
        if segment.program_date_time.is_some() {
            self.position.last_pdt = segment.program_date_time;
        }
        self.position.last_sequence = Some((session, segment.sequence));
        Ok(())
    }

    async fn init(&mut self, url: &str) -> Result<Bytes> {
        if let Some(b) = self.session.as_ref().and_then(|s| s.inits.get(url)) {
            return Ok(b.clone());
        }
        let bytes = self.get(url).await?;
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
