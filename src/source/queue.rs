//! The bounded queue between the decoder and the reader, with its drop policy.

use std::collections::VecDeque;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use parking_lot::{Condvar, Mutex};

use crate::error::Error;
use crate::frame::Frame;

/// What happens when the reader is slower than the camera and the queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryPolicy {
    /// The decoder waits for the reader: nothing is dropped. Right for replays and on-demand
    /// ranges (default for ON_DEMAND and LIVE_REPLAY). On a live stream a reader that stays
    /// slower than the camera falls behind until fragments leave the playlist window.
    Block,
    /// The oldest queued frame makes room for the new one (default for LIVE): latency stays
    /// bounded, the reader sees the newest frames, and every drop is counted.
    DropOldest,
    /// The queue holds one frame, always the newest: for detectors that only ever want "now".
    LatestOnly,
}

impl DeliveryPolicy {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryPolicy::Block => "block",
            DeliveryPolicy::DropOldest => "drop_oldest",
            DeliveryPolicy::LatestOnly => "latest_only",
        }
    }
}

struct Inner {
    items: VecDeque<Frame>,
    /// Bytes of the queued frames.
    bytes: usize,
    terminal: Option<Error>,
    closed: bool,
    wakers: Vec<Waker>,
    /// Blocking readers waiting in `pop`.
    waiting: usize,
}

/// The queue. Frames in, frames (then possibly one terminal error) out.
pub(crate) struct Queue {
    inner: Mutex<Inner>,
    readable: Condvar,
    writable: Condvar,
    capacity: usize,
    /// At most this many bytes of frames are queued (one frame always fits).
    max_bytes: usize,
    policy: DeliveryPolicy,
}

/// What became of a pushed frame.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Pushed {
    /// Queued; `evicted` older frames were dropped for it.
    Queued { evicted: u64 },
    /// The queue is closed (source stopped): the frame was discarded.
    Closed,
    /// The frame's colour conversion failed (logged): the frame was discarded.
    Unconverted,
}

impl Queue {
    pub fn new(capacity: usize, max_bytes: usize, policy: DeliveryPolicy) -> Self {
        let capacity = if policy == DeliveryPolicy::LatestOnly {
            1
        } else {
            capacity.max(1)
        };
        Queue {
            inner: Mutex::new(Inner {
                items: VecDeque::with_capacity(capacity),
                bytes: 0,
                terminal: None,
                closed: false,
                wakers: Vec::new(),
                waiting: 0,
            }),
            readable: Condvar::new(),
            writable: Condvar::new(),
            capacity,
            max_bytes,
            policy,
        }
    }

    /// Whether `inner` has no room for `incoming` more bytes: `capacity` frames, or (with at
    /// least one frame queued) `max_bytes`.
    fn full(&self, inner: &Inner, incoming: usize) -> bool {
        inner.items.len() >= self.capacity
            || (!inner.items.is_empty() && inner.bytes.saturating_add(incoming) > self.max_bytes)
    }

    fn pop_front(inner: &mut Inner) -> Option<Frame> {
        let frame = inner.items.pop_front()?;
        inner.bytes = inner.bytes.saturating_sub(frame.delivered_size());
        Some(frame)
    }

    fn wake(inner: &mut Inner) {
        for waker in inner.wakers.drain(..) {
            waker.wake();
        }
    }

    /// Adds a frame according to the policy (with `Block`, waits while the queue is full).
    pub fn push(&self, frame: Frame) -> Pushed {
        // A reader already waiting takes the frame at once: converted here, right after
        // decoding, while the picture is still in this core's cache (about 10 % less CPU per
        // 720p frame than converting it later on the reader's core). Otherwise the conversion
        // waits for the reader (see `decode::Pending`).
        let frame = if frame.pending.is_some() && self.reader_waiting() {
            match finish(frame) {
                Some(frame) => frame,
                None => return Pushed::Unconverted,
            }
        } else {
            frame
        };
        let size = frame.delivered_size();
        let mut inner = self.inner.lock();
        let mut evicted = 0;
        loop {
            if inner.closed || inner.terminal.is_some() {
                return Pushed::Closed;
            }
            if !self.full(&inner, size) {
                break;
            }
            match self.policy {
                DeliveryPolicy::Block => self.writable.wait(&mut inner),
                DeliveryPolicy::DropOldest | DeliveryPolicy::LatestOnly => {
                    Self::pop_front(&mut inner);
                    evicted += 1;
                }
            }
        }
        inner.bytes = inner.bytes.saturating_add(size);
        inner.items.push_back(frame);
        self.readable.notify_one();
        Self::wake(&mut inner);
        Pushed::Queued { evicted }
    }

    /// Ends the queue with an error, delivered after the frames already queued.
    pub fn fail(&self, error: Error) {
        let mut inner = self.inner.lock();
        if inner.terminal.is_none() && !inner.closed {
            inner.terminal = Some(error);
        }
        self.readable.notify_all();
        self.writable.notify_all();
        Self::wake(&mut inner);
    }

    /// Ends the queue after the frames already queued (end of an on-demand range).
    pub fn finish(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        self.readable.notify_all();
        self.writable.notify_all();
        Self::wake(&mut inner);
    }

    /// Ends the queue at once, discarding queued frames (stop).
    pub fn close(&self) {
        let mut inner = self.inner.lock();
        inner.closed = true;
        inner.items.clear();
        inner.bytes = 0;
        inner.terminal = None;
        self.readable.notify_all();
        self.writable.notify_all();
        Self::wake(&mut inner);
    }

    fn take(&self, inner: &mut Inner) -> Option<Option<Result<Frame, Error>>> {
        if let Some(frame) = Self::pop_front(inner) {
            self.writable.notify_one();
            return Some(Some(Ok(frame)));
        }
        if let Some(error) = inner.terminal.take() {
            inner.closed = true;
            return Some(Some(Err(error)));
        }
        if inner.closed {
            return Some(None);
        }
        None
    }

    /// The next item, waiting up to `timeout` (forever with None). `Ok(None)`: the queue ended;
    /// `Err(())`: timed out. A frame whose colour conversion is still pending is converted
    /// here, in the reader's thread, outside the lock.
    pub fn pop(&self, timeout: Option<Duration>) -> Result<Option<Result<Frame, Error>>, ()> {
        let deadline = timeout.map(|t| std::time::Instant::now() + t);
        loop {
            match self.pop_until(deadline)? {
                Some(Ok(frame)) => match finish(frame) {
                    Some(frame) => return Ok(Some(Ok(frame))),
                    None => continue,
                },
                other => return Ok(other),
            }
        }
    }

    fn pop_until(
        &self,
        deadline: Option<std::time::Instant>,
    ) -> Result<Option<Result<Frame, Error>>, ()> {
        let mut inner = self.inner.lock();
        loop {
            if let Some(item) = self.take(&mut inner) {
                return Ok(item);
            }
            inner.waiting += 1;
            let timed_out = match deadline {
                None => {
                    self.readable.wait(&mut inner);
                    false
                }
                Some(deadline) => self.readable.wait_until(&mut inner, deadline).timed_out(),
            };
            inner.waiting = inner.waiting.saturating_sub(1);
            if timed_out {
                return self.take(&mut inner).ok_or(());
            }
        }
    }

    /// Whether the queue is empty and a reader waits for a frame (blocked in `pop`, or an
    /// async reader that found it empty).
    fn reader_waiting(&self) -> bool {
        let inner = self.inner.lock();
        inner.items.is_empty() && (inner.waiting > 0 || !inner.wakers.is_empty())
    }

    /// The next item for an async reader (a frame's deferred conversion done as in
    /// [`pop`](Self::pop)).
    pub fn poll_pop(&self, cx: &mut Context<'_>) -> Poll<Option<Result<Frame, Error>>> {
        loop {
            let item = {
                let mut inner = self.inner.lock();
                match self.take(&mut inner) {
                    Some(item) => item,
                    None => {
                        if !inner.wakers.iter().any(|w| w.will_wake(cx.waker())) {
                            inner.wakers.push(cx.waker().clone());
                        }
                        return Poll::Pending;
                    }
                }
            };
            match item {
                Some(Ok(frame)) => {
                    if let Some(frame) = finish(frame) {
                        return Poll::Ready(Some(Ok(frame)));
                    }
                }
                other => return Poll::Ready(other),
            }
        }
    }

    /// Whether the queue has ended (finished, failed or closed): nothing more will be added.
    pub fn is_ended(&self) -> bool {
        let inner = self.inner.lock();
        inner.closed || inner.terminal.is_some()
    }

    /// Frames currently queued.
    pub fn len(&self) -> usize {
        self.inner.lock().items.len()
    }

    /// Whether the queue holds as many frames as it can (the reader is behind): no room for
    /// one more frame of the queued frames' average size.
    pub fn is_full(&self) -> bool {
        let inner = self.inner.lock();
        let average = inner.bytes.checked_div(inner.items.len()).unwrap_or(0);
        self.full(&inner, average)
    }
}

/// `frame` with its deferred conversion done; None (with a warning) when it fails, and the
/// frame is dropped.
fn finish(frame: Frame) -> Option<Frame> {
    match frame.finish() {
        Ok(frame) => Some(frame),
        Err(crate::decode::ConvertError(why)) => {
            tracing::warn!(%why, "colour conversion failed: frame dropped");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::PixelFormat;
    use gstreamer as gst;

    /// A GRAY8 frame of `bytes` bytes (`bytes` × 1 pixels), numbered `sequence`.
    fn frame(bytes: usize, sequence: u64) -> Frame {
        gst::init().unwrap();
        let map = gst::Buffer::from_slice(vec![0u8; bytes])
            .into_mapped_buffer_readable()
            .unwrap();
        Frame::for_test(
            map,
            None,
            (bytes as u32, 1),
            PixelFormat::Gray8,
            sequence,
            None,
        )
    }

    fn sequences(queue: &Queue) -> Vec<u64> {
        let mut out = Vec::new();
        while let Ok(Some(Ok(f))) = queue.pop(Some(Duration::ZERO)) {
            out.push(f.sequence());
        }
        out
    }

    #[test]
    fn the_byte_bound_drops_the_oldest_and_one_frame_always_fits() {
        // 10 frames of 3 MiB into 30 frames / 10 MiB: three stay, the newest.
        let queue = Queue::new(30, 10 << 20, DeliveryPolicy::DropOldest);
        let mut evicted = 0;
        for i in 0..10 {
            if let Pushed::Queued { evicted: e } = queue.push(frame(3 << 20, i)) {
                evicted += e;
            }
        }
        assert!(queue.is_full());
        assert_eq!(evicted, 7);
        assert_eq!(sequences(&queue), [7, 8, 9]);
        // A frame larger than the bound still fits, alone.
        queue.push(frame(1, 10));
        queue.push(frame(20 << 20, 11));
        assert_eq!(sequences(&queue), [11]);
        // The count bound still holds for small frames.
        for i in 0..50 {
            queue.push(frame(100, i));
        }
        assert_eq!(queue.len(), 30);
    }

    #[test]
    fn a_blocked_push_waits_for_bytes_to_be_taken() {
        let queue = Arc::new(Queue::new(30, 5 << 20, DeliveryPolicy::Block));
        queue.push(frame(3 << 20, 0));
        let pusher = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || queue.push(frame(3 << 20, 1)))
        };
        // The second frame waits: 6 MiB would exceed 5 MiB. Taking the first lets it in.
        assert_eq!(sequences_one(&queue), Some(0));
        assert_eq!(pusher.join().unwrap(), Pushed::Queued { evicted: 0 });
        assert_eq!(sequences_one(&queue), Some(1));
    }

    fn sequences_one(queue: &Queue) -> Option<u64> {
        match queue.pop(Some(Duration::from_secs(10))) {
            Ok(Some(Ok(f))) => Some(f.sequence()),
            _ => None,
        }
    }

    use std::sync::Arc;

    /// A reader blocked in `pop`, or an async reader that found the queue empty, counts as
    /// waiting (the next frame is then converted as it is pushed); none, or a non-empty queue,
    /// does not.
    #[test]
    fn a_waiting_reader_is_seen_blocking_or_async() {
        let queue = Arc::new(Queue::new(4, usize::MAX, DeliveryPolicy::Block));
        assert!(!queue.reader_waiting());
        let reader = {
            let queue = Arc::clone(&queue);
            std::thread::spawn(move || sequences_one(&queue))
        };
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while !queue.reader_waiting() {
            assert!(
                std::time::Instant::now() < deadline,
                "the reader never waited"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
        queue.push(frame(8, 1));
        assert_eq!(reader.join().unwrap(), Some(1));
        assert!(!queue.reader_waiting(), "nobody waits any more");

        let waker = futures_util::task::noop_waker();
        let mut cx = Context::from_waker(&waker);
        assert!(queue.poll_pop(&mut cx).is_pending());
        assert!(
            queue.reader_waiting(),
            "the async reader registered its waker"
        );
        queue.push(frame(8, 2));
        assert!(!queue.reader_waiting(), "a frame is queued");
    }
}
