//! Frame sources: [`KvsHlsFrameSource`] (KVS over HLS), [`UriFrameSource`] (RTSP, HLS URLs,
//! files), and what every source shares: the
//! delivery queue and its [`DeliveryPolicy`], [`SourceState`], [`SourceStats`], the blocking
//! [`Frames`] iterator and the async [`FrameStream`].

mod kvs_hls;
mod queue;
mod uri;

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;

pub use kvs_hls::{
    Container, DiscontinuityMode, KvsHlsFrameSource, KvsHlsFrameSourceBuilder, PlaybackMode,
    TimestampSelector,
};
pub use queue::DeliveryPolicy;
pub(crate) use queue::{Pushed, Queue};
pub use uri::{EndOfStream, RtspTransport, UriFrameSource, UriFrameSourceBuilder, UriKind};

use crate::error::Result;
use crate::frame::Frame;

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
}

impl DropReason {
    /// The `reason` label value.
    pub fn as_str(self) -> &'static str {
        match self {
            DropReason::QueueFull => "queue_full",
            DropReason::TargetFps => "target_fps",
        }
    }
}

/// A snapshot of a source's counters and state.
#[derive(Clone, Debug, Default)]
pub struct SourceStats {
    /// Current state.
    pub state: SourceState,
    /// Frames handed to the reader's queue.
    pub frames_delivered: u64,
    /// Frames dropped because the reader was behind (policy `DropOldest`/`LatestOnly`).
    pub frames_dropped_queue_full: u64,
    /// Frames dropped to honour `target_fps`.
    pub frames_dropped_target_fps: u64,
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
    /// Errors while reading (each failed request, stall or decode error).
    pub read_errors: u64,
    /// Decode errors (the pipeline was rebuilt after each).
    pub decode_errors: u64,
    /// Decode pipelines built (1 + rebuilds).
    pub pipelines_built: u64,
    /// Errors in a row without a fragment in between.
    pub consecutive_errors: u32,
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
        self.frames_dropped_queue_full + self.frames_dropped_target_fps
    }
}

/// What the sources share with their iterators and streams.
pub(crate) struct Core {
    pub queue: Queue,
    state: AtomicU8,
    pub stats: Mutex<SourceStats>,
}

impl Core {
    pub fn new(queue: Queue) -> Self {
        Core {
            queue,
            state: AtomicU8::new(SourceState::Disconnected as u8),
            stats: Mutex::new(SourceStats::default()),
        }
    }

    pub fn state(&self) -> SourceState {
        SourceState::from_u8(self.state.load(Ordering::Relaxed))
    }

    pub fn set_state(&self, state: SourceState) {
        self.state.store(state as u8, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> SourceStats {
        let mut stats = self.stats.lock().clone();
        stats.state = self.state();
        stats.queue_len = self.queue.len();
        stats
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
