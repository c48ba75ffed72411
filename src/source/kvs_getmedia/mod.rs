//! [`KvsGetMediaFrameSource`]: live KVS video through `GetMedia`, frames decoded as their bytes
//! arrive (sub-second behind the camera), with producer timestamps.
//!
//! ```text
//!            ┌─────────────────────── control task (tokio) ───────────────────────┐
//!  KVS  ◀──  │ GetDataEndpoint(GET_MEDIA) (cached) → GetMedia {StartSelector}     │  reconnect: continuation token,
//!            │ one chunked MKV response: fragment after fragment, frame by frame  │  backoff on errors, ≤ 4 calls/s
//!            │ MkvReader (webm-iterable push decoder): tags, track, blocks        │
//!            └──────────────────────────────┬─────────────────────────────────────┘
//!                                           ▼ one access unit at a time (caps from CodecPrivate)
//!            decoder thread: appsrc → parsebin (h264parse/h265parse) → avdec_* → tail → appsink
//!                                           ▼ Frame, producer time = fragment's producer timestamp + block offset
//!            bounded queue (Block | DropOldest | LatestOnly) → frames() / stream()
//! ```
//!
//! Resuming: the reader remembers the continuation token of the last *complete* fragment (its
//! `AWS_KINESISVIDEO_CONTINUATION_TOKEN` tag, after its cluster) and how many blocks of the
//! fragment in progress it has handed to the decoder. After any disconnect it asks for
//! `CONTINUATION_TOKEN` (or, before the first complete fragment, the `PRODUCER_TIMESTAMP` of the
//! fragment in progress), KVS sends that fragment again from its key frame, and the reader skips
//! the blocks it already passed on: a fragment cut in the middle is neither lost nor repeated.

mod mkv;
mod reader;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

use super::kvs_hls::{Ctx, SharedClientSource as ClientSource, Sink, client_setters};
use super::{CommonOptions, common_setters};
use super::{Core, FrameStream, Frames, Queue, SourceState, SourceStats};
use crate::backoff::BackoffPolicy;
use crate::decode::{Decoder, DecoderThreads, FrameSink, Head};
use crate::error::{Error, Result};
use crate::frame::PixelFormat;
use crate::kvs::{KvsClient, StreamId};
use crate::metrics::FrameSourceMetrics;
use crate::source::DeliveryPolicy;

/// Where a [`KvsGetMediaFrameSource`] starts reading (GetMedia's `StartSelector`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum GetMediaStart {
    /// The newest fragment (KVS: "the latest chunk"): live. The default.
    Now,
    /// The oldest fragment the stream keeps.
    Earliest,
    /// The fragment that holds this producer timestamp (else the first after it).
    ProducerTimestamp(SystemTime),
    /// The fragment that holds this server timestamp (else the first after it).
    ServerTimestamp(SystemTime),
    /// The fragment after this fragment number.
    AfterFragmentNumber(String),
    /// Where an earlier connection left off (its `AWS_KINESISVIDEO_CONTINUATION_TOKEN`).
    ContinuationToken(String),
}

/// Live video of one KVS stream through `GetMedia`: decoded frames about a frame behind the
/// camera instead of a fragment and a playlist poll (HLS).
///
/// ```no_run
/// use kvs_frames::{KvsGetMediaFrameSource, PixelFormat};
///
/// let source = KvsGetMediaFrameSource::builder("front-door", "my-kvs-stream")
///     .region("us-east-1")
///     .pixel_format(PixelFormat::Bgr)
///     .build()?;
/// for item in source.frames() {
///     let (frame, producer_time) = item?;
///     tracing::info!("{}x{} at {:?}", frame.width(), frame.height(), producer_time);
/// }
/// # Ok::<(), kvs_frames::Error>(())
/// ```
///
/// The API is [`KvsHlsFrameSource`](crate::KvsHlsFrameSource)'s: the same frame, queue,
/// conversion and decoder options, states, stats and metrics (same names; a camera is read
/// through one transport, so there is no transport label). Each frame's
/// [`FragmentId`](crate::FragmentId) carries the KVS fragment number and server timestamp.
/// A source uses one of the stream's 3 GetMedia connections and at most 4 of its 5 calls per
/// second.
pub struct KvsGetMediaFrameSource {
    ctx: Arc<Ctx>,
    core: Arc<Core>,
    decoder: Arc<Decoder>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

impl std::fmt::Debug for KvsGetMediaFrameSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvsGetMediaFrameSource")
            .field("camera_id", &self.ctx.camera_id)
            .field("state", &self.core.state())
            .finish_non_exhaustive()
    }
}

impl KvsGetMediaFrameSource {
    /// A builder for camera `camera_id` (the metrics label) reading KVS stream `stream` (a name,
    /// or an ARN starting with `arn:`).
    pub fn builder(camera_id: &str, stream: impl Into<StreamId>) -> KvsGetMediaFrameSourceBuilder {
        KvsGetMediaFrameSourceBuilder {
            stream: stream.into(),
            client: ClientSource::Env { region: None },
            start: GetMediaStart::Now,
            read_timeout: Duration::from_secs(10),
            delivery: None,
            common: CommonOptions::new(camera_id),
        }
    }

    /// Blocking iterator of `Result<(Frame, timestamp)>`.
    pub fn frames(&self) -> Frames<'_> {
        Frames { core: &self.core }
    }

    /// Async stream of the same items.
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

    /// Counters and state (`sessions` counts GetMedia connections, `fragments_fetched` the
    /// fragments received whole).
    pub fn stats(&self) -> SourceStats {
        let mut stats = self.core.snapshot();
        stats.pipelines_built = self.decoder.pipelines_built();
        stats
    }

    /// Healthy = connected and a frame delivered within the last 30 s (or none expected yet).
    pub fn is_healthy(&self) -> bool {
        self.core.is_healthy()
    }

    /// Stops reading: the connection closes, the pipeline is released, iterators end. Also done
    /// on drop.
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

impl Drop for KvsGetMediaFrameSource {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Builder of a [`KvsGetMediaFrameSource`]; every option is validated by [`build`](Self::build).
#[derive(Clone)]
pub struct KvsGetMediaFrameSourceBuilder {
    stream: StreamId,
    client: ClientSource,
    start: GetMediaStart,
    read_timeout: Duration,
    delivery: Option<DeliveryPolicy>,
    common: CommonOptions,
}

impl std::fmt::Debug for KvsGetMediaFrameSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvsGetMediaFrameSourceBuilder")
            .field("camera_id", &self.common.camera_id)
            .field("stream", &self.stream)
            .field("start", &self.start)
            .finish_non_exhaustive()
    }
}

impl KvsGetMediaFrameSourceBuilder {
    client_setters!();
    /// Where to start (default [`GetMediaStart::Now`]).
    #[must_use]
    pub fn start(mut self, start: GetMediaStart) -> Self {
        self.start = start;
        self
    }
    /// Reconnect when the connection delivers no byte for this long, 1 s–120 s (default 10 s;
    /// KVS itself ends a response after about 3 s without anything new).
    #[must_use]
    pub fn read_timeout(mut self, timeout: Duration) -> Self {
        self.read_timeout = timeout;
        self
    }
    /// Delivery policy (default `DropOldest`: live).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    common_setters!();

    fn validate(&self) -> Result<()> {
        self.common.validate()?;
        self.stream.validate()?;
        if !(Duration::from_secs(1)..=Duration::from_secs(120)).contains(&self.read_timeout) {
            return Err(Error::invalid_config(
                "read_timeout",
                format!("{:?}", self.read_timeout),
                "must be between 1 s and 120 s",
            ));
        }
        let token_like = |what: &'static str, v: &str, digits_only: bool| -> Result<()> {
            let ok = !v.is_empty()
                && v.len() <= 128
                && v.bytes().all(|b| {
                    if digits_only {
                        b.is_ascii_digit()
                    } else {
                        b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')
                    }
                });
            if ok {
                Ok(())
            } else {
                Err(Error::invalid_config(
                    what,
                    format!("{v:?}"),
                    if digits_only {
                        "must be 1-128 digits"
                    } else {
                        "must be 1-128 characters of [a-zA-Z0-9_.-]"
                    },
                ))
            }
        };
        match &self.start {
            GetMediaStart::AfterFragmentNumber(n) => token_like("start", n, true)?,
            GetMediaStart::ContinuationToken(t) => token_like("start", t, false)?,
            _ => {}
        }
        Ok(())
    }

    /// Validates every option, builds the decode pipeline (a missing GStreamer plugin is
    /// reported here) and starts reading in the background.
    ///
    /// Decoder threads: unless set, one per source — libav's frame threading holds a frame
    /// back per thread, which is the latency GetMedia is chosen to avoid.
    pub fn build(mut self) -> Result<KvsGetMediaFrameSource> {
        self.validate()?;
        self.common
            .require_elements(crate::decode::KVS_HEAD_ELEMENTS)?;
        if self.common.decoder_threads == DecoderThreads::Auto {
            self.common.decoder_threads = DecoderThreads::Fixed(1);
        }
        let policy = self.delivery.unwrap_or(DeliveryPolicy::DropOldest);
        let core = Arc::new(
            Core::new(Queue::new(
                self.common.queue_capacity,
                self.common.queue_bytes,
                policy,
            ))
            .counting_into(self.common.metrics.clone(), &self.common.camera_id),
        );
        let ctx = Ctx::new(&self.common, Arc::clone(&core));
        let sink: Arc<dyn FrameSink> = Arc::new(Sink(Arc::clone(&ctx)));
        let decoder = Arc::new(Decoder::start_with(
            self.common.decode_config(),
            sink,
            Head::Elementary,
        )?);
        let handle = self.common.runtime_handle()?;
        ctx.set_state(SourceState::Connecting);
        let task = handle.spawn(reader::run(Arc::clone(&ctx), Arc::clone(&decoder), self));
        Ok(KvsGetMediaFrameSource {
            ctx,
            core,
            decoder,
            task: Mutex::new(Some(task)),
        })
    }
}
