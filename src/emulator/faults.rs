//! Fault injection.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::store::State;

/// The faults active on one stream. A fault is active while `Instant::now()` is before its end.
#[derive(Debug, Default)]
pub(crate) struct FaultState {
    offline_until: Option<Instant>,
    server_errors_until: Option<Instant>,
    throttle_until: Option<Instant>,
    reset_until: Option<Instant>,
    stall_until: Option<Instant>,
    stall_for: Duration,
    denied_until: Option<Instant>,
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

    /// Ends every active fault of this stream.
    pub fn clear(&self) {
        self.with(|f| *f = FaultState::default());
    }
}
