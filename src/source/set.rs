//! [`SourceSet`]: many cameras as one stream of `(camera_id, frame, timestamp)`.

use std::collections::BTreeMap;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::time::SystemTime;

use futures_util::Stream;
use parking_lot::Mutex;

use super::{FrameStream, KvsGetMediaFrameSource, KvsHlsFrameSource, SourceStats, UriFrameSource};
use crate::error::{Error, Result};
use crate::frame::Frame;

/// A source a [`SourceSet`] can hold: a KVS stream or a URI (RTSP, HLS, file).
#[derive(Debug)]
pub enum SetMember {
    /// A KVS stream over HLS.
    Kvs(KvsHlsFrameSource),
    /// A KVS stream over GetMedia.
    GetMedia(KvsGetMediaFrameSource),
    /// An RTSP camera, an HLS URL or a file.
    Uri(UriFrameSource),
}

impl From<KvsHlsFrameSource> for SetMember {
    fn from(source: KvsHlsFrameSource) -> Self {
        SetMember::Kvs(source)
    }
}

impl From<KvsGetMediaFrameSource> for SetMember {
    fn from(source: KvsGetMediaFrameSource) -> Self {
        SetMember::GetMedia(source)
    }
}

impl From<UriFrameSource> for SetMember {
    fn from(source: UriFrameSource) -> Self {
        SetMember::Uri(source)
    }
}

impl SetMember {
    /// The member's camera id.
    pub fn camera_id(&self) -> &str {
        match self {
            SetMember::Kvs(s) => s.camera_id(),
            SetMember::GetMedia(s) => s.camera_id(),
            SetMember::Uri(s) => s.camera_id(),
        }
    }

    /// The member's counters and state.
    pub fn stats(&self) -> SourceStats {
        match self {
            SetMember::Kvs(s) => s.stats(),
            SetMember::GetMedia(s) => s.stats(),
            SetMember::Uri(s) => s.stats(),
        }
    }

    /// Whether the member is healthy.
    pub fn is_healthy(&self) -> bool {
        match self {
            SetMember::Kvs(s) => s.is_healthy(),
            SetMember::GetMedia(s) => s.is_healthy(),
            SetMember::Uri(s) => s.is_healthy(),
        }
    }

    fn stream(&self) -> FrameStream {
        match self {
            SetMember::Kvs(s) => s.stream(),
            SetMember::GetMedia(s) => s.stream(),
            SetMember::Uri(s) => s.stream(),
        }
    }

    fn stop(&self) {
        match self {
            SetMember::Kvs(s) => s.stop(),
            SetMember::GetMedia(s) => s.stop(),
            SetMember::Uri(s) => s.stop(),
        }
    }
}

/// One item of a [`SourceSet`]: which camera, and what its source yielded (a frame with its
/// timestamp, or the fatal error that ended that camera; the others go on).
pub type SetItem = (Arc<str>, Result<(Frame, SystemTime)>);

struct Entry {
    id: Arc<str>,
    member: Arc<SetMember>,
    frames: FrameStream,
    /// The member's stream ended (stopped, fatal error, end of a range).
    ended: bool,
}

#[derive(Default)]
struct Members {
    entries: Vec<Entry>,
    /// Where the next poll starts: round robin, so that a busy camera never starves the others.
    next: usize,
    /// Readers waiting for a member to be added.
    wakers: Vec<Waker>,
}

struct Inner {
    members: Mutex<Members>,
    stopped: AtomicBool,
}

/// Many sources — any mix of [`KvsHlsFrameSource`] and [`UriFrameSource`] — read as one: an
/// async [`Stream`] ([`stream`](Self::stream)) and a blocking iterator
/// ([`frames`](Self::frames)) of `(camera_id, Result<(frame, timestamp)>)`.
///
/// - **Fair**: the cameras are polled in turn, starting one further each time, so a camera that
///   always has a frame ready never starves the others, and a stalled one holds nobody up (each
///   source keeps its own queue and delivery policy).
/// - **Add and remove at runtime** ([`add`](Self::add), [`remove`](Self::remove)); a reader
///   waiting on an empty set wakes when a camera is added.
/// - A camera whose source ends (a fatal error, yielded once with its id, or the end of an
///   ON_DEMAND range) leaves the rotation; its stats stay until it is removed.
/// - [`stop`](Self::stop) stops every source; the stream and the iterator end when every queue
///   is drained. Dropping the set stops them too.
/// - Across replicas of a service, add only the cameras this replica owns:
///   [`Shard::owns`](crate::kvs::Shard::owns), or discover them with
///   [`DiscoveryOptions::shard`](crate::kvs::DiscoveryOptions::shard).
///
/// ```no_run
/// use futures_util::StreamExt;
/// use kvs_frames::{KvsHlsFrameSource, SourceSet};
///
/// # async fn example(config: aws_config::SdkConfig) -> kvs_frames::Result<()> {
/// let set = SourceSet::new();
/// for name in ["cam-1", "cam-2", "cam-3"] {
///     set.add(KvsHlsFrameSource::builder(name, name).sdk_config(&config).build()?)?;
/// }
/// let mut frames = set.stream();
/// while let Some((camera, item)) = frames.next().await {
///     let (frame, captured_at) = item?;
///     // detect(&camera, &frame) …
/// #   let _ = (camera, frame, captured_at);
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct SourceSet {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SourceSet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SourceSet")
            .field("cameras", &self.camera_ids())
            .field("stopped", &self.inner.stopped.load(Ordering::SeqCst))
            .finish()
    }
}

impl Default for SourceSet {
    fn default() -> Self {
        Self::new()
    }
}

/// Totals over the cameras of a [`SourceSet`].
#[non_exhaustive]
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SetStats {
    /// Cameras in the set.
    pub cameras: usize,
    /// Of those, healthy ones (see the sources' `is_healthy`).
    pub healthy: usize,
    /// Frames delivered, all cameras.
    pub frames_delivered: u64,
    /// Frames dropped, every reason, all cameras.
    pub frames_dropped: u64,
    /// Reconnections, all cameras.
    pub reconnects: u64,
    /// Read errors, all cameras.
    pub read_errors: u64,
}

impl SourceSet {
    /// An empty set.
    #[must_use]
    pub fn new() -> Self {
        SourceSet {
            inner: Arc::new(Inner {
                members: Mutex::new(Members::default()),
                stopped: AtomicBool::new(false),
            }),
        }
    }

    /// Adds a source; its camera id must be new in the set ([`ErrorKind::InvalidConfig`]
    /// otherwise, naming it, and the source is stopped). A stopped set refuses it
    /// ([`ErrorKind::Stopped`]).
    ///
    /// [`ErrorKind::InvalidConfig`]: crate::ErrorKind::InvalidConfig
    /// [`ErrorKind::Stopped`]: crate::ErrorKind::Stopped
    pub fn add(&self, source: impl Into<SetMember>) -> Result<()> {
        let member = source.into();
        if self.inner.stopped.load(Ordering::SeqCst) {
            member.stop();
            return Err(super::stopped().context("SourceSet::add"));
        }
        let mut members = self.inner.members.lock();
        if members.entries.iter().any(|e| &*e.id == member.camera_id()) {
            member.stop();
            return Err(Error::invalid_config(
                "SourceSet::add",
                format!("{:?}", member.camera_id()),
                "a camera with this id is already in the set",
            ));
        }
        let frames = member.stream();
        members.entries.push(Entry {
            id: Arc::from(member.camera_id()),
            member: Arc::new(member),
            frames,
            ended: false,
        });
        for waker in members.wakers.drain(..) {
            waker.wake();
        }
        Ok(())
    }

    /// Removes camera `camera_id` and stops its source; whether it was there. Frames it had
    /// queued are not delivered.
    pub fn remove(&self, camera_id: &str) -> bool {
        let removed = {
            let mut members = self.inner.members.lock();
            let Some(i) = members.entries.iter().position(|e| &*e.id == camera_id) else {
                return false;
            };
            members.entries.remove(i)
        };
        removed.member.stop();
        true
    }

    /// The camera ids, in the order they were added.
    pub fn camera_ids(&self) -> Vec<String> {
        self.inner
            .members
            .lock()
            .entries
            .iter()
            .map(|e| e.id.to_string())
            .collect()
    }

    /// Camera `camera_id`'s source (its stats, state, health).
    pub fn get(&self, camera_id: &str) -> Option<Arc<SetMember>> {
        self.inner
            .members
            .lock()
            .entries
            .iter()
            .find(|e| &*e.id == camera_id)
            .map(|e| Arc::clone(&e.member))
    }

    /// Each camera's counters and state, by camera id.
    pub fn stats(&self) -> BTreeMap<String, SourceStats> {
        self.members()
            .into_iter()
            .map(|m| (m.camera_id().to_owned(), m.stats()))
            .collect()
    }

    /// Totals over every camera.
    pub fn aggregate_stats(&self) -> SetStats {
        let members = self.members();
        let mut total = SetStats {
            cameras: members.len(),
            ..SetStats::default()
        };
        for m in &members {
            let s = m.stats();
            total.healthy += usize::from(m.is_healthy());
            total.frames_delivered += s.frames_delivered;
            total.frames_dropped += s.frames_dropped();
            total.reconnects += s.reconnects;
            total.read_errors += s.read_errors;
        }
        total
    }

    /// Stops every source; the stream and the iterator end once their queues are drained, and
    /// [`add`](Self::add) is refused from now on.
    pub fn stop(&self) {
        self.inner.stopped.store(true, Ordering::SeqCst);
        let members = {
            let mut members = self.inner.members.lock();
            for waker in members.wakers.drain(..) {
                waker.wake();
            }
            members
                .entries
                .iter()
                .map(|e| Arc::clone(&e.member))
                .collect::<Vec<_>>()
        };
        for m in members {
            m.stop();
        }
    }

    /// The async stream of every camera's items (see the type's docs). Several streams of one
    /// set share the cameras: each frame goes to one of them.
    pub fn stream(&self) -> SetStream {
        SetStream {
            inner: Arc::clone(&self.inner),
        }
    }

    /// The blocking iterator of every camera's items (for threads outside async code).
    pub fn frames(&self) -> SetFrames {
        SetFrames {
            stream: self.stream(),
            waker: None,
        }
    }

    fn members(&self) -> Vec<Arc<SetMember>> {
        self.inner
            .members
            .lock()
            .entries
            .iter()
            .map(|e| Arc::clone(&e.member))
            .collect()
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        for e in &self.members.get_mut().entries {
            e.member.stop();
        }
    }
}

/// The async stream of a [`SourceSet`] ([`SourceSet::stream`]).
pub struct SetStream {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for SetStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetStream").finish_non_exhaustive()
    }
}

impl Stream for SetStream {
    type Item = SetItem;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        let mut members = self.inner.members.lock();
        let n = members.entries.len();
        let start = if n == 0 { 0 } else { members.next % n };
        for k in 0..n {
            let i = (start + k) % n;
            let entry = &mut members.entries[i];
            if entry.ended {
                continue;
            }
            match Pin::new(&mut entry.frames).poll_next(cx) {
                Poll::Ready(Some(item)) => {
                    let id = Arc::clone(&entry.id);
                    if item.is_err() {
                        // A source yields one fatal error, then ends.
                        entry.ended = true;
                    }
                    members.next = i + 1;
                    return Poll::Ready(Some((id, item)));
                }
                Poll::Ready(None) => entry.ended = true,
                Poll::Pending => {}
            }
        }
        let all_ended = members.entries.iter().all(|e| e.ended);
        if self.inner.stopped.load(Ordering::SeqCst) && all_ended {
            return Poll::Ready(None);
        }
        // Woken by a member's queue, or by `add`/`stop`.
        if !members.wakers.iter().any(|w| w.will_wake(cx.waker())) {
            members.wakers.push(cx.waker().clone());
        }
        Poll::Pending
    }
}

/// The blocking iterator of a [`SourceSet`] ([`SourceSet::frames`]).
#[derive(Debug)]
pub struct SetFrames {
    stream: SetStream,
    /// The waiting thread's waker, made once per thread (the sources' queues keep one waker
    /// per reader, not one per call).
    waker: Option<(std::thread::ThreadId, Waker)>,
}

/// Wakes the thread that waits in [`SetFrames::next`].
struct ThreadWaker(std::thread::Thread);

impl Wake for ThreadWaker {
    fn wake(self: Arc<Self>) {
        self.0.unpark();
    }
    fn wake_by_ref(self: &Arc<Self>) {
        self.0.unpark();
    }
}

impl Iterator for SetFrames {
    type Item = SetItem;

    fn next(&mut self) -> Option<Self::Item> {
        let thread = std::thread::current();
        let waker = match &self.waker {
            Some((id, waker)) if *id == thread.id() => waker.clone(),
            _ => {
                let waker = Waker::from(Arc::new(ThreadWaker(thread.clone())));
                self.waker = Some((thread.id(), waker.clone()));
                waker
            }
        };
        let mut cx = Context::from_waker(&waker);
        loop {
            match Pin::new(&mut self.stream).poll_next(&mut cx) {
                Poll::Ready(item) => return item,
                // A wake-up that came before the park makes the park return at once.
                Poll::Pending => std::thread::park(),
            }
        }
    }
}
