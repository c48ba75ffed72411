//! The control task of a [`KvsHlsFrameSource`](super::KvsHlsFrameSource): where it is (the
//! fragments fed, the decoder timeline), its top-level loop and how it ends.

use super::*;

mod feed;
mod follow;
mod session;

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
    /// (track_ID, timescale) of every track of the init segment (video and audio).
    track_timescales: Vec<(u32, u32)>,
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
    /// The first connection found no fragment yet and waited for the camera once.
    waited_for_first_fragment: bool,
}

/// How long the first connection waits when the stream has no fragment yet (a camera that has
/// just started: its first fragment is on its way), times a random 0.8–1.2 so that many
/// sources started together do not ask in step.
const FIRST_FRAGMENT_WAIT: Duration = Duration::from_secs(1);

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

pub(super) async fn run(ctx: Arc<Ctx>, decoder: Arc<Decoder>, opts: KvsHlsFrameSourceBuilder) {
    // Whatever ends this task (a panic, a runtime shutdown), the iterator ends too.
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| {
        if !guard_ctx.stopped() {
            fail(&guard_ctx, e);
        }
    });
    let client = opts.client.resolve().await;
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
        waited_for_first_fragment: false,
    };
    reader.run().await;
}

pub(crate) fn fail(ctx: &Ctx, error: Error) {
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
            if self.first_fragment_pending(&error) {
                if self.wait_for_first_fragment(&error).await.is_err() {
                    return;
                }
                continue;
            }
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
            self.ctx.note_failure(self.failures);
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
            self.ctx.note_reconnect(delay);
            if self.ctx.sleep(delay).await.is_err() {
                return;
            }
            self.ctx.reset_progress();
        }
    }

    /// Whether `error` is the first connection finding no fragment yet: the camera has not
    /// started sending (KVS answers so right after a producer starts, as the emulator does
    /// before its camera's first fragment). Once per source, and not for a range already over
    /// (which "no fragments" ends).
    fn first_fragment_pending(&self, error: &Error) -> bool {
        error.kind() == ErrorKind::NoFragments
            && !self.waited_for_first_fragment
            && !self.position.fed_any()
            && self.failures == 0
            && !self.range_ended()
    }

    /// Waits about [`FIRST_FRAGMENT_WAIT`] for the camera's first fragment: logged at INFO, and
    /// counted as [`SourceStats::waits_for_first_fragment`](crate::source::SourceStats), not as
    /// a reconnect or a read error. The state stays Connecting.
    async fn wait_for_first_fragment(&mut self, error: &Error) -> Result<()> {
        self.waited_for_first_fragment = true;
        let factor = rand::random_range(0.8..=1.2);
        let delay = FIRST_FRAGMENT_WAIT.mul_f64(factor);
        tracing::info!(camera = %self.camera(), %error, ?delay, "no fragment yet: waiting for the camera's first fragment");
        self.ctx.core.stats.lock().waits_for_first_fragment += 1;
        self.ctx.sleep(delay).await?;
        self.ctx.reset_progress();
        Ok(())
    }

    /// Counts a failed request, stall or decode error.
    fn count_read_error(&self, error: &Error) {
        self.ctx.count_read_error(error);
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
        confirm_stream_gone(&self.client, &self.opts.stream, error).await
    }
}

/// A 404 that says "stream not found" is confirmed with DescribeStream: fatal if the stream is
/// gone, else a transient "no fragments" (KVS also answers 404 when a camera is merely
/// offline). Other errors are returned as they are.
pub(crate) async fn confirm_stream_gone(
    client: &KvsClient,
    stream: &StreamId,
    error: Error,
) -> Error {
    if error.kind() != ErrorKind::StreamNotFound {
        return error;
    }
    let mut request = client.control().describe_stream();
    request = match stream {
        StreamId::Name(n) => request.stream_name(n),
        StreamId::Arn(a) => request.stream_arn(a),
    };
    match request.send().await {
        Err(e) => {
            let e = Error::from_sdk("DescribeStream", e);
            if e.kind() == ErrorKind::StreamNotFound {
                e.context(format!("stream {stream} is gone"))
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
