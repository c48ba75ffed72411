//! HLS streaming sessions: parameters, tokens, expiry and per-session request quotas.

use std::time::{Instant, SystemTime};

use super::store::random_string;

/// `PlaybackMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum PlaybackMode {
    Live,
    LiveReplay,
    OnDemand,
}

/// `FragmentSelectorType`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Selector {
    Producer,
    Server,
}

/// `DiscontinuityMode`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Discontinuity {
    Always,
    Never,
    /// ON_DISCONTINUITY
    OnGap,
}

/// The kinds of HLS request, each with its own per-session quota.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum HlsRequest {
    Master,
    MediaPlaylist,
    Init,
    Fragment,
}

impl HlsRequest {
    /// KVS quotas per session: 5 TPS for playlists and init, 20 TPS for media fragments.
    fn tps(self) -> f64 {
        match self {
            HlsRequest::Fragment => 20.0,
            _ => 5.0,
        }
    }
}

/// A token bucket: `rate` tokens per second, at most `rate` banked.
#[derive(Debug)]
pub(crate) struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    fn new(rate: f64) -> Self {
        Bucket {
            tokens: rate,
            last: Instant::now(),
        }
    }
    fn take(&mut self, rate: f64) -> bool {
        let now = Instant::now();
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.last = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// One HLS streaming session.
#[derive(Debug)]
pub(crate) struct Session {
    pub stream: String,
    pub mode: PlaybackMode,
    pub selector: Selector,
    pub discontinuity: Discontinuity,
    pub display_timestamps: bool,
    pub max_results: usize,
    pub start: Option<SystemTime>,
    pub end: Option<SystemTime>,
    pub expires_at: SystemTime,
    pub created: Instant,
    pub revoked: bool,
    /// Closed by KVS because a sixth session of the stream was created.
    pub closed: bool,
    /// Index of the fragment that has session-local number (and media sequence) 0.
    pub base_index: u64,
    /// Codec generation of the fragment at `base_index` (its init URL carries no number).
    pub base_generation: u64,
    /// Subtracted from fragments' decode times when served (`DecodeTimeOrigin::Session`).
    pub decode_origin: Option<u64>,
    /// `ContainerFormat=MPEG_TS`: TS segments instead of fMP4.
    pub mpeg_ts: bool,
    buckets: [Bucket; 4],
}

impl Session {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        stream: String,
        mode: PlaybackMode,
        selector: Selector,
        discontinuity: Discontinuity,
        display_timestamps: bool,
        max_results: usize,
        start: Option<SystemTime>,
        end: Option<SystemTime>,
        expires_at: SystemTime,
        base_index: u64,
        base_generation: u64,
    ) -> Self {
        Session {
            stream,
            mode,
            selector,
            discontinuity,
            display_timestamps,
            max_results,
            start,
            end,
            expires_at,
            created: Instant::now(),
            revoked: false,
            closed: false,
            base_index,
            base_generation,
            decode_origin: None,
            mpeg_ts: false,
            buckets: [
                Bucket::new(HlsRequest::Master.tps()),
                Bucket::new(HlsRequest::MediaPlaylist.tps()),
                Bucket::new(HlsRequest::Init.tps()),
                Bucket::new(HlsRequest::Fragment.tps()),
            ],
        }
    }

    /// Whether the token no longer works at `now` (the emulator's session clock).
    pub fn expired(&self, now: SystemTime) -> bool {
        self.revoked || now >= self.expires_at
    }

    /// Takes one request from the quota of `kind`; false when over the quota.
    pub fn admit(&mut self, kind: HlsRequest) -> bool {
        let i = match kind {
            HlsRequest::Master => 0,
            HlsRequest::MediaPlaylist => 1,
            HlsRequest::Init => 2,
            HlsRequest::Fragment => 3,
        };
        self.buckets[i].take(kind.tps())
    }
}

/// A new session token: like KVS's, it is long, starts with `CiA`, contains characters that
/// must be percent-encoded in a URL (`+`, `/`, `=`) and ends with `~`.
pub(crate) fn new_token() -> String {
    let body = random_string(
        180,
        b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=",
    );
    format!("CiA{body}~")
}

/// Percent-encodes a query value, leaving only RFC 3986 unreserved characters as they are.
pub(crate) fn encode_query_value(value: &str) -> String {
    let mut out = String::with_capacity(value.len() * 3 / 2);
    for b in value.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
