//! Fault injection.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use super::store::State;

/// A request kind that [`Faults::fail_next`] can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Request {
    /// `GetHLSStreamingSessionURL`.
    SessionUrl,
    /// `getHLSMasterPlaylist.m3u8`.
    MasterPlaylist,
    /// `getHLSMediaPlaylist.m3u8`.
    MediaPlaylist,
    /// `getMP4InitFragment.mp4`.
    InitSegment,
    /// `getMP4MediaFragment.mp4`.
    MediaFragment,
}

/// How a request targeted by [`Faults::fail_next`] fails.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Failure {
    /// HTTP 500 `InternalFailure`.
    ServerError,
    /// HTTP 403 `NotAuthorizedException` (on an HLS URL: the session token is refused, as when
    /// it expired; on `GetHLSStreamingSessionURL`: access denied).
    Forbidden,
    /// HTTP 400 `ClientLimitExceededException`.
    Throttled,
    /// HLS requests: half of the body, then the connection is reset (`GetHLSStreamingSessionURL`:
    /// like [`ServerError`](Failure::ServerError)).
    Reset,
    /// Media fragments: HTTP 200 with a fragment whose track fragment header (`tfhd`) claims
    /// fields it lacks, which GStreamer's demuxer refuses: a decode error; playlists: HTTP 200
    /// without the `#EXTM3U` line, which no parser accepts (the token URLs are still in it);
    /// init segments and `GetHLSStreamingSessionURL`: like [`ServerError`](Failure::ServerError).
    Corrupt,
    /// Media fragments: HTTP 200 with the fragment's structure intact and its media data (the
    /// payload of `mdat`) overwritten with bytes that are no H.264: decoders conceal such data,
    /// or fail at end-of-stream when nothing could be decoded (other requests: like
    /// [`ServerError`](Failure::ServerError)).
    GarbledMedia,
    /// HTTP 404 `ResourceNotFoundException` "No fragments found…": what KVS answers before a
    /// camera's first fragment arrives (on any request of the HLS API).
    NoFragments,
}

/// How far the producer clock of [`Faults::shift_producer_timestamps`] is off.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ClockShift {
    /// Producer timestamps earlier than the real time by this much (a clock that stepped back).
    Behind(Duration),
    /// Producer timestamps later than the real time by this much.
    Ahead(Duration),
}

impl ClockShift {
    /// `t` as the shifted clock shows it.
    pub(crate) fn apply(self, t: SystemTime) -> SystemTime {
        match self {
            ClockShift::Behind(d) => t.checked_sub(d).unwrap_or(t),
            ClockShift::Ahead(d) => t.checked_add(d).unwrap_or(t),
        }
    }
}

/// The faults active on one stream. A fault is active while `Instant::now()` is before its end.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    /// One-shot faults: (request, failure, requests to let through first, requests left to
    /// fail), applied in order.
    next: Vec<(Request, Failure, u32, u32)>,
    clock_shift: Option<(ClockShift, Instant)>,
    offline_until: Option<Instant>,
    server_errors_until: Option<Instant>,
    throttle_until: Option<Instant>,
    reset_until: Option<Instant>,
    stall_until: Option<Instant>,
    stall_for: Duration,
    denied_until: Option<Instant>,
    /// GetMedia: frames the stream's connections may still write before the one writing the
    /// next is cut (one-shot).
    pub(crate) get_media_cut_after: Option<u64>,
    /// GetMedia: the next connections, one value each, are cut after writing that many frames.
    pub(crate) get_media_connection_cuts: std::collections::VecDeque<u64>,
    /// GetMedia: connections opened while set end (cleanly) after this long.
    pub(crate) get_media_lifetime: Option<Duration>,
    /// GetMedia: the next fragment boundary of a connection writes these error tags and ends
    /// the connection (one-shot).
    pub(crate) get_media_error: Option<(String, u32)>,
}

fn active(until: Option<Instant>) -> bool {
    until.is_some_and(|t| Instant::now() < t)
}

impl FaultState {
    pub fn camera_offline(&self) -> bool {
        active(self.offline_until)
    }
    pub fn server_errors(&self) -> bool {
        active(self.server_errors_until)
    }
    pub fn throttled(&self) -> bool {
        active(self.throttle_until)
    }
    pub fn reset_fragments(&self) -> bool {
        active(self.reset_until)
    }
    pub fn access_denied(&self) -> bool {
        active(self.denied_until)
    }
    /// The failure for this request of kind `request`, if a one-shot fault targets it (the
    /// fault is used up by one).
    pub fn take(&mut self, request: Request) -> Option<Failure> {
        let i = self.next.iter().position(|(r, ..)| *r == request)?;
        let entry = self.next.get_mut(i)?;
        if entry.2 > 0 {
            entry.2 -= 1;
            return None;
        }
        entry.3 = entry.3.saturating_sub(1);
        let failure = entry.1;
        if entry.3 == 0 {
            self.next.remove(i);
        }
        Some(failure)
    }
    /// The producer clock's shift, while the fault is active.
    pub fn clock_shift(&self) -> Option<ClockShift> {
        self.clock_shift
            .filter(|(_, until)| Instant::now() < *until)
            .map(|(shift, _)| shift)
    }
    /// How long a fragment download stalls half-way, if the stall fault is active.
    pub fn stall(&self) -> Option<Duration> {
        active(self.stall_until).then_some(self.stall_for)
    }
}

/// Fault injection for one stream of an [`Emulator`](super::Emulator).
///
/// Every fault starts at once and lasts for the given duration (a later call replaces an earlier
/// one of the same kind; `Duration::ZERO` ends it).
#[derive(Clone)]
pub struct Faults {
    state: Arc<State>,
    stream: String,
}

impl std::fmt::Debug for Faults {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Faults")
            .field("stream", &self.stream)
            .finish()
    }
}

impl Faults {
    pub(crate) fn new(state: Arc<State>, stream: String) -> Self {
        Faults { state, stream }
    }

    fn with(&self, f: impl FnOnce(&mut FaultState)) {
        let mut streams = self.state.streams.lock();
        if let Some(stream) = streams.get_mut(&self.stream) {
            f(&mut stream.faults);
        }
    }

    /// The camera goes offline: no fragment is ingested for `duration` (the frames of that time
    /// are lost, as with a real camera). After 30 s without fragments, LIVE requests fail with
    /// `ResourceNotFoundException` "No fragments found…", as on KVS.
    pub fn camera_offline(&self, duration: Duration) {
        tracing::info!(stream = %self.stream, ?duration, "fault: camera offline");
        self.with(|f| f.offline_until = Some(Instant::now() + duration));
    }

    /// Every HLS request (playlists, init and media fragments) fails with HTTP 500 for `duration`.
    pub fn server_errors(&self, duration: Duration) {
        tracing::info!(stream = %self.stream, ?duration, "fault: HTTP 500 on HLS");
        self.with(|f| f.server_errors_until = Some(Instant::now() + duration));
    }

    /// Every HLS request and `GetHLSStreamingSessionURL` call fails with HTTP 400
    /// `ClientLimitExceededException` for `duration`.
    pub fn throttle(&self, duration: Duration) {
        tracing::info!(stream = %self.stream, ?duration, "fault: throttling");
        self.with(|f| f.throttle_until = Some(Instant::now() + duration));
    }

    /// Media fragment downloads send half of the body, then the connection is reset, for
    /// `duration`.
    pub fn reset_fragment_downloads(&self, duration: Duration) {
        tracing::info!(stream = %self.stream, ?duration, "fault: connection reset mid-fragment");
        self.with(|f| f.reset_until = Some(Instant::now() + duration));
    }

    /// Media fragment downloads started during the next `duration` send half of the body, then
    /// nothing for `stall_for`, then the rest.
    pub fn stall_fragment_downloads(&self, duration: Duration, stall_for: Duration) {
        tracing::info!(stream = %self.stream, ?duration, ?stall_for, "fault: stalled fragment downloads");
        self.with(|f| {
            f.stall_until = Some(Instant::now() + duration);
            f.stall_for = stall_for;
        });
    }

    /// Every API call about the stream (control plane, GetHLSStreamingSessionURL, GetClip) fails
    /// with 403 `NotAuthorizedException` for `duration`, as when an IAM policy denies access.
    pub fn deny_access(&self, duration: Duration) {
        tracing::info!(stream = %self.stream, ?duration, "fault: access denied");
        self.with(|f| f.denied_until = Some(Instant::now() + duration));
    }

    /// Every HLS session of the stream that exists now stops working: its requests fail with
    /// 403 `NotAuthorizedException` "Streaming session token is expired". New sessions work.
    pub fn revoke_sessions(&self) {
        tracing::info!(stream = %self.stream, "fault: session tokens revoked");
        let mut sessions = self.state.sessions.lock();
        for session in sessions.values_mut() {
            if session.stream == self.stream {
                session.revoked = true;
            }
        }
    }

    /// The camera changes its resolution at its next fragment boundary: the new fragments come
    /// after a discontinuity with a new init segment (new codec private data).
    pub fn change_resolution(&self, width: u32, height: u32) {
        tracing::info!(stream = %self.stream, width, height, "fault: resolution change");
        let streams = self.state.streams.lock();
        if let Some(camera) = streams.get(&self.stream).and_then(|s| s.camera.as_ref()) {
            camera.set_resolution(width, height);
        }
    }

    /// Deletes the stream (as `DeleteStream` would): its camera stops, and every request about
    /// it, including those of existing HLS sessions, fails with `ResourceNotFoundException`.
    pub fn delete_stream(&self) {
        tracing::info!(stream = %self.stream, "fault: stream deleted");
        self.state.remove_stream(&self.stream);
    }

    /// The next `count` requests of kind `request` about this stream fail with `failure`; the
    /// requests after them work again. Calls add up: faults for the same kind apply in the order
    /// they were added.
    pub fn fail_next(&self, request: Request, failure: Failure, count: u32) {
        tracing::info!(stream = %self.stream, ?request, ?failure, count, "fault: next requests fail");
        if count > 0 {
            self.with(|f| f.next.push((request, failure, 0, count)));
        }
    }

    /// Like [`fail_next`](Self::fail_next) for one request, the `nth` of kind `request` from now
    /// (1 = the next one): the `nth − 1` before it work.
    pub fn fail_nth(&self, request: Request, nth: u32, failure: Failure) {
        tracing::info!(stream = %self.stream, ?request, ?failure, nth, "fault: one request fails");
        if nth > 0 {
            self.with(|f| f.next.push((request, failure, nth - 1, 1)));
        }
    }

    /// The producer clock steps: fragments ingested during the next `duration` carry producer
    /// timestamps (and `EXT-X-PROGRAM-DATE-TIME`) off by `shift`, as from a camera whose clock
    /// was set wrong and then corrected. Server timestamps stay right; the ground truth records
    /// the shifted producer times.
    pub fn shift_producer_timestamps(&self, shift: ClockShift, duration: Duration) {
        tracing::info!(stream = %self.stream, ?shift, ?duration, "fault: producer clock shifted");
        self.with(|f| f.clock_shift = Some((shift, Instant::now() + duration)));
    }

    /// GetMedia: after `frames` more frames written (by any connection of the stream), the
    /// connection about to write the next one is cut: its response ends without the chunked
    /// encoding's last chunk, in the middle of a cluster, as when the network drops (one-shot).
    pub fn cut_get_media_after(&self, frames: u64) {
        tracing::info!(stream = %self.stream, frames, "fault: GetMedia connection cut");
        self.with(|f| f.get_media_cut_after = Some(frames));
    }

    /// GetMedia: each of the next `cuts.len()` connections is cut (as by
    /// [`cut_get_media_after`](Self::cut_get_media_after)) after writing the given number of
    /// frames *itself*: e.g. `[14, 4]` cuts one connection inside a fragment and the next one
    /// while it is still sending that fragment again.
    pub fn cut_get_media_connections(&self, cuts: &[u64]) {
        tracing::info!(stream = %self.stream, ?cuts, "fault: GetMedia connections cut");
        self.with(|f| f.get_media_connection_cuts.extend(cuts.iter().copied()));
    }

    /// GetMedia: connections opened from now on end after `lifetime`, cleanly (the last chunk is
    /// sent) but wherever they are, mid-cluster too, as KVS ends long connections (about 45
    /// minutes) without an error. `None` ends the fault.
    pub fn get_media_lifetime(&self, lifetime: Option<Duration>) {
        tracing::info!(stream = %self.stream, ?lifetime, "fault: GetMedia connection lifetime");
        self.with(|f| f.get_media_lifetime = lifetime);
    }

    /// GetMedia: at the next fragment boundary a connection writes an error chunk (the tags
    /// `AWS_KINESISVIDEO_ERROR_CODE` = `code`, `AWS_KINESISVIDEO_ERROR_ID` = `error_id`, e.g.
    /// 3002 for a write error) and ends (one-shot).
    pub fn get_media_error(&self, code: &str, error_id: u32) {
        tracing::info!(stream = %self.stream, code, error_id, "fault: GetMedia error tag");
        let code = code.to_owned();
        self.with(|f| f.get_media_error = Some((code, error_id)));
    }

    /// Ends every active fault of this stream.
    pub fn clear(&self) {
        self.with(|f| *f = FaultState::default());
    }
}
