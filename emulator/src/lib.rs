//! # kvs-emulator
//!
//! A local Kinesis Video Streams emulator, for tests, demos and development without AWS.
//!
//! The emulator is a real HTTP server on `127.0.0.1` that speaks the parts of the KVS API this
//! crate (and most KVS consumers) use, the way AWS speaks them:
//!
//! * the control plane (`ListStreams`, `DescribeStream`, `GetDataEndpoint`, `CreateStream`,
//!   `DeleteStream`) as REST-JSON requests signed with SigV4, answered with the JSON bodies and
//!   `x-amzn-ErrorType` errors the AWS SDKs parse into their typed errors;
//! * the archived-media API: `GetHLSStreamingSessionURL` (LIVE, LIVE_REPLAY, ON_DEMAND, every
//!   parameter validated like KVS does) and `GetClip` (a real, playable MP4);
//! * the media API's `GetMedia`: one chunked MKV response per connection, written frame by
//!   frame as the camera encodes them, with KVS's tags, every `StartSelector`, continuation
//!   tokens and the per-stream connection and call-rate limits;
//! * HLS in the shape KVS serves it: master and media playlists, fMP4 init and media fragments,
//!   `EXT-X-PROGRAM-DATE-TIME`, discontinuities, session-local fragment numbers, session expiry,
//!   per-session request quotas;
//! * one synthetic live camera per stream: frames rendered with their frame number (as a
//!   machine-readable [`barcode`] and as text) and producer time, encoded by GStreamer's x264enc,
//!   cut into fragments on key frames and published in real time.
//!
//! Tests get the ground truth (every fragment published, see [`FragmentRecord`]) and can inject
//! faults at any time ([`Faults`]).
//!
//! ```no_run
//! use std::time::Duration;
//! use kvs_emulator::{Emulator, StreamSpec};
//!
//! # fn main() -> kvs_emulator::Result<()> {
//! let emulator = Emulator::builder()
//!     .stream(StreamSpec::new("cam-1").resolution(640, 360).fps(25).fragment_duration(Duration::from_secs(2)))
//!     .start()?;
//! tracing::info!("KVS endpoint: {}", emulator.endpoint());
//! // Any AWS SDK client built from this config talks to the emulator.
//! let config = emulator.sdk_config();
//! let client = aws_sdk_kinesisvideo::Client::new(&config);
//! # let _ = client;
//! emulator.faults("cam-1")?.camera_offline(Duration::from_secs(40));
//! # Ok(())
//! # }
//! ```
//!
//! What it does not do (yet): DASH, GetImages, PutMedia ingestion, audio in MPEG-TS sessions and
//! GetMedia, and
//! SigV4 signature *verification* (requests must carry a well-formed SigV4 `Authorization` header
//! for the `kinesisvideo` service, like AWS requires, but any access key and signature is
//! accepted so that any client configuration works).

#![deny(missing_docs)]
#![forbid(clippy::print_stdout, clippy::print_stderr)]

mod audio;
pub mod barcode;
mod camera;
mod control;
pub mod elements;
mod error;
mod faults;
mod fragments;
mod hls;
mod http;
mod media;
mod mkv;
mod mp4;
mod refusals;
mod server;
mod session;
mod store;
mod ts;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

pub use faults::{ClockShift, Failure, Faults, Request};
pub use media::GetMediaStats;
pub use refusals::{OPERATIONS, Refusal};
pub use store::{FragmentRecord, RequestStats, StreamStatus};

pub use error::{Error, ErrorKind, Result};

/// Access key id of the credentials returned by [`Emulator::sdk_config`].
pub const ACCESS_KEY_ID: &str = "AKIDKVSFRAMESEMULATOR";
/// Secret key of the credentials returned by [`Emulator::sdk_config`] (a test value, not a secret).
pub const SECRET_ACCESS_KEY: &str = "kvs-frames-emulator-test-secret-key";
/// The account id used in the ARNs the emulator makes.
pub const ACCOUNT_ID: &str = "123456789012";

/// Where the fMP4 decode time (`tfdt`) of the fragments an HLS session serves starts.
///
/// KVS does not document the epoch of `tfdt` in its HLS fragments, so clients must take wall
/// time from `EXT-X-PROGRAM-DATE-TIME`, never from `tfdt`. Either choice here is continuous inside
/// a session and never equal to wall time.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum DecodeTimeOrigin {
    /// 0 at the first fragment of each session (default): the same fragment has a different
    /// decode time in different sessions. Players that map the first decode time of a live
    /// stream to running time 0 (GStreamer's `hlsdemux`, ffplay) play it in real time.
    #[default]
    Session,
    /// One decode time for the whole stream, continuous since the camera started, from a random
    /// origin hundreds of hours away from 0 and from wall time: for testing clients that must not
    /// depend on `tfdt`.
    Stream,
}

/// The state of a stream's synthetic camera, see [`Emulator::camera_status`].
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CameraStatus {
    /// Whether the camera thread is still encoding.
    pub running: bool,
    /// Frames encoded so far (including history).
    pub frames_encoded: u64,
    /// The error that stopped the camera, if one did (e.g. a GStreamer element failed).
    pub last_error: Option<String>,
}

/// A camera's frame rate, `num / den` frames per second: `25/1`, or NTSC's `30000/1001`
/// (29.97 fps, a frame step of 33.3667 ms that is not a whole number of milliseconds).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct FrameRate {
    /// Frames …
    pub num: u32,
    /// … per this many seconds.
    pub den: u32,
}

impl FrameRate {
    /// NTSC 29.97 fps (`30000/1001`).
    pub const NTSC: FrameRate = FrameRate {
        num: 30_000,
        den: 1001,
    };

    /// `fps` frames per second.
    pub const fn integer(fps: u32) -> Self {
        FrameRate { num: fps, den: 1 }
    }

    /// Frames per second as a float.
    pub fn as_f64(self) -> f64 {
        f64::from(self.num) / f64::from(self.den.max(1))
    }

    /// Nanoseconds from frame 0 to frame `n` (`n · den · 10⁹ / num`, rounded down: exact
    /// integer arithmetic, no accumulated rounding).
    pub fn nanos(self, n: u64) -> u128 {
        u128::from(n) * u128::from(self.den) * 1_000_000_000 / u128::from(self.num.max(1))
    }
}

impl std::fmt::Display for FrameRate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.den == 1 {
            write!(f, "{}", self.num)
        } else {
            write!(f, "{}/{} ({:.3})", self.num, self.den, self.as_f64())
        }
    }
}

/// How a fragment with B-frames writes its composition offsets (PTS − DTS); KVS does not
/// document which it serves, so the emulator offers both.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum CompositionOffsets {
    /// As the encoder makes them (x264: the key frame at +2 frame durations with 2 B-frames),
    /// `trun` version 0: the fragment's first picture is shown after its decode time.
    #[default]
    Positive,
    /// Shifted so that the key frame's is 0 and B-frames' are negative (`trun` version 1, as
    /// CMAF prefers): the first picture is shown at the decode time.
    Negative,
}

/// The video codec of a stream's camera.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum VideoCodec {
    /// H.264 (`x264enc`; KVS codec ID `V_MPEG/ISO/AVC`, MP4 `avc1`), the default.
    #[default]
    H264,
    /// H.265 (`x265enc`; KVS codec ID `V_MPEGH/ISO/HEVC`, MP4 `hvc1` with `hvcC`), which KVS
    /// serves over HLS (fMP4) and GetClip.
    H265,
}

impl VideoCodec {
    /// The stream's `MediaType` for this codec (`video/h264`, `video/h265`).
    pub fn media_type(self) -> &'static str {
        match self {
            VideoCodec::H264 => "video/h264",
            VideoCodec::H265 => "video/h265",
        }
    }
}

/// Description of one emulated stream and its synthetic camera.
///
/// Defaults: 1280x720, 25 fps, 2 s fragments, 1500 kbit/s, no history, 300 ms ingest delay
/// (server time = producer time + delay), 24 h retention, status ACTIVE, a live camera.
#[derive(Clone, Debug)]
pub struct StreamSpec {
    pub(crate) name: String,
    pub(crate) width: u32,
    pub(crate) height: u32,
    pub(crate) rate: FrameRate,
    pub(crate) fragment_duration: Duration,
    pub(crate) bitrate_kbps: u32,
    pub(crate) history: Duration,
    pub(crate) ingest_delay: Duration,
    pub(crate) retention_hours: u32,
    pub(crate) status: StreamStatus,
    pub(crate) camera: bool,
    pub(crate) media_type: String,
    pub(crate) device_name: Option<String>,
    pub(crate) decode_time_origin: DecodeTimeOrigin,
    pub(crate) tfdt_version_0: bool,
    pub(crate) live: bool,
    pub(crate) codec: VideoCodec,
    pub(crate) b_frames: u32,
    pub(crate) offsets: CompositionOffsets,
    pub(crate) audio: bool,
    pub(crate) audio_layout: AudioLayout,
}

/// How an HLS session presents a stream's audio track (KVS does not document it: see
/// docs/emulator.md).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum AudioLayout {
    /// Track 2 inside the same fMP4 fragments as the video (a second `traf`). The default.
    #[default]
    Muxed,
    /// A separate rendition: the master playlist's `EXT-X-MEDIA:TYPE=AUDIO` points at a media
    /// playlist of its own (`TrackNumber=2`) with audio-only init and media fragments; the
    /// variant's fragments hold the video alone.
    SeparateRendition,
}

impl StreamSpec {
    /// A stream named `name` with the defaults above.
    pub fn new(name: impl Into<String>) -> Self {
        StreamSpec {
            name: name.into(),
            width: 1280,
            height: 720,
            rate: FrameRate::integer(25),
            fragment_duration: Duration::from_secs(2),
            bitrate_kbps: 1500,
            history: Duration::ZERO,
            ingest_delay: Duration::from_millis(300),
            retention_hours: 24,
            status: StreamStatus::Active,
            camera: true,
            media_type: "video/h264".to_owned(),
            device_name: None,
            decode_time_origin: DecodeTimeOrigin::Session,
            tfdt_version_0: false,
            live: true,
            codec: VideoCodec::H264,
            b_frames: 0,
            offsets: CompositionOffsets::Positive,
            audio: false,
            audio_layout: AudioLayout::Muxed,
        }
    }
    /// An AAC audio track beside the video (default none), as from a camera with a
    /// microphone: KVS track 2 (`A_AAC`), mono 48 kHz, served in the same fMP4 fragments (a
    /// second `traf`, the init segment with a second `trak`) and listed in the master
    /// playlist's `CODECS` (`mp4a.40.2`); GetClip keeps it as track 2. The audio is encoded
    /// silence, real AAC frames on the video's timeline.
    #[must_use]
    pub fn audio(mut self, enabled: bool) -> Self {
        self.audio = enabled;
        self
    }

    /// How HLS presents the audio track (default [`AudioLayout::Muxed`]); implies
    /// [`audio(true)`](Self::audio).
    #[must_use]
    pub fn audio_layout(mut self, layout: AudioLayout) -> Self {
        self.audio = true;
        self.audio_layout = layout;
        self
    }
    /// B-frames between reference frames (0–3, H.264; default 0): fragments hold their
    /// samples in decode order with composition offsets written as `offsets` says, like the
    /// many encoders that emit B-frames. The camera then delivers a fragment `b_frames`
    /// pictures later (the encoder holds them back).
    #[must_use]
    pub fn b_frames(mut self, count: u32, offsets: CompositionOffsets) -> Self {
        self.b_frames = count;
        self.offsets = offsets;
        self
    }
    /// The camera's codec (default H.264); also sets the stream's `MediaType` to the codec's
    /// (`video/h265`), which [`media_type`](Self::media_type) can override afterwards.
    #[must_use]
    pub fn codec(mut self, codec: VideoCodec) -> Self {
        self.codec = codec;
        self.media_type = codec.media_type().to_owned();
        self
    }
    /// Whether the camera goes on live after its [`history`](Self::history) (default true).
    /// With `false` the stream holds only the archived history (whole fragments) and the
    /// camera then stops: an archive-only stream for ON_DEMAND and GetClip work, with no
    /// encoder running in the background.
    #[must_use]
    pub fn live(mut self, live: bool) -> Self {
        self.live = live;
        self
    }
    /// Where the `tfdt` decode time of served fragments starts (default
    /// [`DecodeTimeOrigin::Session`]).
    #[must_use]
    pub fn decode_time_origin(mut self, origin: DecodeTimeOrigin) -> Self {
        self.decode_time_origin = origin;
        self
    }
    /// Whether media fragments are served with version-0 `tfdt` boxes (a 32-bit decode time, 4
    /// bytes shorter) instead of version 1 (default false). KVS does not document the version
    /// it writes; a client must read both. Where a decode time does not fit 32 bits (13.25 h
    /// at 90 kHz from the origin, e.g. with [`DecodeTimeOrigin::Stream`]) version 1 is served.
    #[must_use]
    pub fn tfdt_version_0(mut self, version_0: bool) -> Self {
        self.tfdt_version_0 = version_0;
        self
    }
    /// Picture size in pixels (even numbers, 16x16 up to 3840x2160).
    #[must_use]
    pub fn resolution(mut self, width: u32, height: u32) -> Self {
        self.width = width;
        self.height = height;
        self
    }
    /// Frames per second (1–120, an integer like most cameras).
    #[must_use]
    pub fn fps(mut self, fps: u32) -> Self {
        self.rate = FrameRate::integer(fps);
        self
    }
    /// A fractional frame rate, `num / den` per second (1–120 fps), e.g.
    /// [`FrameRate::NTSC`] for 29.97: frame times are exact (integer nanoseconds from frame 0,
    /// decode times in a 90 kHz timescale when it divides evenly), so they never drift.
    #[must_use]
    pub fn frame_rate(mut self, rate: FrameRate) -> Self {
        self.rate = rate;
        self
    }
    /// Fragment (and GOP) duration, rounded to whole frames; KVS fragments last 1–20 s, the
    /// emulator accepts 100 ms–20 s so that tests can make many fragments quickly.
    #[must_use]
    pub fn fragment_duration(mut self, duration: Duration) -> Self {
        self.fragment_duration = duration;
        self
    }
    /// Encoder bit rate in kbit/s.
    #[must_use]
    pub fn bitrate_kbps(mut self, kbps: u32) -> Self {
        self.bitrate_kbps = kbps;
        self
    }
    /// Video already archived when the emulator starts: the camera encodes this much of the past
    /// as fast as it can (with past producer times) before it goes live. Useful for ON_DEMAND,
    /// LIVE_REPLAY and GetClip tests that should not wait.
    #[must_use]
    pub fn history(mut self, history: Duration) -> Self {
        self.history = history;
        self
    }
    /// Server timestamp = producer timestamp + this delay (default 300 ms).
    #[must_use]
    pub fn ingest_delay(mut self, delay: Duration) -> Self {
        self.ingest_delay = delay;
        self
    }
    /// `DataRetentionInHours` (0 means no retention: HLS then fails with
    /// `NoDataRetentionException`, as on KVS).
    #[must_use]
    pub fn retention_hours(mut self, hours: u32) -> Self {
        self.retention_hours = hours;
        self
    }
    /// The stream's status as the control plane reports it (default ACTIVE).
    #[must_use]
    pub fn status(mut self, status: StreamStatus) -> Self {
        self.status = status;
        self
    }
    /// Whether the stream has a live synthetic camera (default true). Without one the stream
    /// exists but holds no media.
    #[must_use]
    pub fn camera(mut self, enabled: bool) -> Self {
        self.camera = enabled;
        self
    }
    /// The stream's `MediaType` (default `video/h264`; anything else makes HLS fail with
    /// `UnsupportedStreamMediaTypeException`).
    #[must_use]
    pub fn media_type(mut self, media_type: impl Into<String>) -> Self {
        self.media_type = media_type.into();
        self
    }
    /// The stream's `DeviceName`.
    #[must_use]
    pub fn device_name(mut self, name: impl Into<String>) -> Self {
        self.device_name = Some(name.into());
        self
    }

    pub(crate) fn frames_per_fragment(&self) -> u32 {
        let frames = (self.fragment_duration.as_secs_f64() * self.rate.as_f64()).round();
        (frames as u32).max(1)
    }

    fn validate(&self) -> Result<()> {
        if self.audio && self.tfdt_version_0 {
            return Err(Error::invalid_config(
                "StreamSpec::audio",
                "with tfdt_version_0",
                "version-0 tfdt boxes are only written for video-only streams",
            ));
        }
        if self.b_frames > 3 || (self.b_frames > 0 && self.codec != VideoCodec::H264) {
            return Err(Error::invalid_config(
                "StreamSpec::b_frames",
                self.b_frames,
                "0..=3, with H.264",
            ));
        }
        if !store::valid_stream_name(&self.name) {
            return Err(Error::invalid_config(
                "StreamSpec::name",
                &self.name,
                "stream names are 1-256 characters of [a-zA-Z0-9_.-]",
            ));
        }
        if !(16..=3840).contains(&self.width)
            || !(16..=2160).contains(&self.height)
            || !self.width.is_multiple_of(2)
            || !self.height.is_multiple_of(2)
        {
            return Err(Error::invalid_config(
                "StreamSpec::resolution",
                format!("{}x{}", self.width, self.height),
                "width and height must be even, 16..=3840 by 16..=2160",
            ));
        }
        let FrameRate { num, den } = self.rate;
        if den == 0 || num < den || u64::from(num) > 120 * u64::from(den) {
            return Err(Error::invalid_config(
                "StreamSpec::fps",
                self.rate,
                "must be 1..=120 frames per second (num/den, den > 0)",
            ));
        }
        if self.fragment_duration < Duration::from_millis(100)
            || self.fragment_duration > Duration::from_secs(20)
        {
            return Err(Error::invalid_config(
                "StreamSpec::fragment_duration",
                format!("{:?}", self.fragment_duration),
                "must be between 100 ms and 20 s",
            ));
        }
        if !(50..=50_000).contains(&self.bitrate_kbps) {
            return Err(Error::invalid_config(
                "StreamSpec::bitrate_kbps",
                self.bitrate_kbps,
                "must be 50..=50000",
            ));
        }
        if !self.live && self.history < self.fragment_duration {
            return Err(Error::invalid_config(
                "StreamSpec::history",
                format!("{:?}", self.history),
                "an archive-only stream (live(false)) needs at least one fragment of history",
            ));
        }
        if self.history > Duration::from_secs(24 * 3600) {
            return Err(Error::invalid_config(
                "StreamSpec::history",
                format!("{:?}", self.history),
                "must be at most 24 h",
            ));
        }
        Ok(())
    }
}

/// Builder of an [`Emulator`]; see [`Emulator::builder`].
#[derive(Clone, Debug)]
pub struct EmulatorBuilder {
    streams: Vec<StreamSpec>,
    port: u16,
    region: String,
    max_fragments_per_stream: usize,
    list_streams_page_limit: Option<usize>,
    wait_for_cameras: bool,
    refusals: Vec<(String, Refusal)>,
}

impl EmulatorBuilder {
    /// Whether [`start`](Self::start) returns only once every live camera has published its
    /// first fragment (default true), so that a reader started right after finds the stream
    /// playing. `false` returns as soon as the server listens: the first fragment of each
    /// camera comes one fragment duration later, and until then `GetHLSStreamingSessionURL`
    /// (LIVE) answers "No fragments found", as KVS does right after a producer starts.
    #[must_use]
    pub fn wait_for_cameras(mut self, wait: bool) -> Self {
        self.wait_for_cameras = wait;
        self
    }
    /// Answers every call of API `operation` (one of [`OPERATIONS`], for example
    /// `"ListFragments"`) with `refusal`, as KVS does for an account whose IAM policy does not
    /// allow it; [`Emulator::refuse_api`] changes it while running. An unknown name fails
    /// [`start`](Self::start).
    #[must_use]
    pub fn refuse_api(mut self, operation: impl Into<String>, refusal: Refusal) -> Self {
        self.refusals.push((operation.into(), refusal));
        self
    }
    /// Adds a stream (with its camera, unless disabled in the spec).
    #[must_use]
    pub fn stream(mut self, spec: StreamSpec) -> Self {
        self.streams.push(spec);
        self
    }
    /// Port on 127.0.0.1 (default 0: a free port chosen by the system).
    #[must_use]
    pub fn port(mut self, port: u16) -> Self {
        self.port = port;
        self
    }
    /// Region reported in ARNs and used by [`Emulator::sdk_config`] (default `us-east-1`).
    #[must_use]
    pub fn region(mut self, region: impl Into<String>) -> Self {
        self.region = region.into();
        self
    }
    /// How many fragments each stream keeps in memory (default 3600, e.g. 2 h of 2 s
    /// fragments); older ones are dropped as if their retention had passed.
    #[must_use]
    pub fn max_fragments_per_stream(mut self, max: usize) -> Self {
        self.max_fragments_per_stream = max.max(1);
        self
    }
    /// Caps the page size of `ListStreams` below what the caller asks for (to exercise
    /// pagination with few streams).
    #[must_use]
    pub fn list_streams_page_limit(mut self, limit: usize) -> Self {
        self.list_streams_page_limit = Some(limit.max(1));
        self
    }

    /// Validates the streams, binds the port, starts the cameras and the server, and (unless
    /// [`wait_for_cameras`](Self::wait_for_cameras) is off) waits until every live camera has
    /// published its first fragment: an error names a camera that did not within ten fragment
    /// durations plus 10 s.
    pub fn start(self) -> Result<Emulator> {
        for spec in &self.streams {
            spec.validate()?;
        }
        for (i, a) in self.streams.iter().enumerate() {
            if self.streams[..i].iter().any(|b| b.name == a.name) {
                return Err(Error::invalid_config(
                    "EmulatorBuilder::stream",
                    &a.name,
                    "stream names must be unique",
                ));
            }
        }
        gstreamer::init().map_err(|e| {
            Error::new(
                ErrorKind::Pipeline,
                format!("cannot initialise GStreamer: {e}"),
            )
        })?;
        let listener = std::net::TcpListener::bind(("127.0.0.1", self.port)).map_err(|e| {
            Error::new(
                ErrorKind::Io,
                format!("cannot bind 127.0.0.1:{}: {e}", self.port),
            )
        })?;
        let addr = listener.local_addr().map_err(Error::from)?;
        let endpoint = format!("http://{addr}");
        // The data endpoint has a listener of its own, as on KVS (another host): a client that
        // calls the archived-media API at the control endpoint fails.
        let data_listener = std::net::TcpListener::bind(("127.0.0.1", 0))
            .map_err(|e| Error::new(ErrorKind::Io, format!("cannot bind 127.0.0.1:0: {e}")))?;
        let data_endpoint = format!(
            "http://{}",
            data_listener.local_addr().map_err(Error::from)?
        );
        let state = Arc::new(store::State::new(store::Settings {
            data_endpoint: data_endpoint.clone(),
            region: self.region.clone(),
            max_fragments_per_stream: self.max_fragments_per_stream,
            list_streams_page_limit: self.list_streams_page_limit,
        }));
        for (operation, refusal) in &self.refusals {
            state.refusals.set(operation, Some(*refusal))?;
        }
        let cameras: Vec<(String, Duration)> = self
            .streams
            .iter()
            .filter(|s| s.camera && s.live)
            .map(|s| (s.name.clone(), s.fragment_duration))
            .collect();
        for spec in self.streams {
            store::State::add_stream(&state, spec)?;
        }
        let server = server::Server::start(listener, data_listener, Arc::clone(&state))?;
        tracing::info!(%endpoint, %data_endpoint, "KVS emulator listening");
        let emulator = Emulator {
            state,
            server: Some(server),
            addr,
            endpoint,
            data_endpoint,
            region: self.region,
        };
        if self.wait_for_cameras {
            for (name, fragment) in cameras {
                let timeout = fragment.saturating_mul(10) + Duration::from_secs(10);
                if !emulator.wait_for_fragments(&name, 1, timeout) {
                    return Err(Error::new(
                        ErrorKind::Pipeline,
                        format!(
                            "the camera of stream {name:?} published no fragment within {timeout:?}"
                        ),
                    ));
                }
            }
        }
        Ok(emulator)
    }
}

/// A running emulator. Dropping it stops the server and the cameras.
pub struct Emulator {
    state: Arc<store::State>,
    server: Option<server::Server>,
    addr: SocketAddr,
    endpoint: String,
    data_endpoint: String,
    region: String,
}

impl std::fmt::Debug for Emulator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Emulator")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .finish_non_exhaustive()
    }
}

impl Emulator {
    /// A builder with no streams, a free port and region `us-east-1`.
    pub fn builder() -> EmulatorBuilder {
        EmulatorBuilder {
            streams: Vec::new(),
            port: 0,
            region: "us-east-1".to_owned(),
            max_fragments_per_stream: 3600,
            list_streams_page_limit: None,
            wait_for_cameras: true,
            refusals: Vec::new(),
        }
    }

    /// The base URL of the control plane, e.g. `http://127.0.0.1:41234` (what
    /// [`sdk_config`](Self::sdk_config) points at).
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The base URL of the data endpoint that `GetDataEndpoint` returns, on a port of its own:
    /// the archived-media API (GetHLSStreamingSessionURL, GetClip, ListFragments) and HLS are
    /// served there only, as on KVS, so a client that skips GetDataEndpoint fails.
    pub fn data_endpoint(&self) -> &str {
        &self.data_endpoint
    }

    /// The socket address the server listens on.
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// The region the emulator reports.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// An AWS SDK configuration pointed at the emulator, with test credentials
    /// ([`ACCESS_KEY_ID`], [`SECRET_ACCESS_KEY`]) and the emulator's region.
    pub fn sdk_config(&self) -> aws_config::SdkConfig {
        let credentials = aws_credential_types::Credentials::new(
            ACCESS_KEY_ID,
            SECRET_ACCESS_KEY,
            None,
            None,
            "kvs-frames-emulator",
        );
        aws_config::SdkConfig::builder()
            .behavior_version(aws_config::BehaviorVersion::latest())
            .region(aws_config::Region::new(self.region.clone()))
            .endpoint_url(self.endpoint.clone())
            .credentials_provider(
                aws_credential_types::provider::SharedCredentialsProvider::new(credentials),
            )
            .build()
    }

    /// Fault injection for one stream. Fails with [`ErrorKind::StreamNotFound`] for an unknown
    /// stream.
    pub fn faults(&self, stream: &str) -> Result<Faults> {
        if !self.state.has_stream(stream) {
            return Err(Error::new(
                ErrorKind::StreamNotFound,
                format!("the emulator has no stream named {stream:?}"),
            ));
        }
        Ok(Faults::new(Arc::clone(&self.state), stream.to_owned()))
    }

    /// Every fragment published on `stream` since the emulator started (including history),
    /// oldest first, whether or not it is still retained. Empty for an unknown stream.
    pub fn ground_truth(&self, stream: &str) -> Vec<FragmentRecord> {
        self.state.ground_truth(stream)
    }

    /// [`wait_for_fragments`](Self::wait_for_fragments) for async code: sleeps on the runtime's
    /// timer instead of blocking the thread (any tokio runtime, `current_thread` included).
    pub async fn wait_for_fragments_async(
        &self,
        stream: &str,
        count: usize,
        timeout: Duration,
    ) -> bool {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            if self.state.ground_truth_len(stream) >= count {
                return true;
            }
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until `stream` has published at least `count` fragments in total, or `timeout`
    /// passes; returns whether it did. Blocks the thread: from async code use
    /// [`wait_for_fragments_async`](Self::wait_for_fragments_async).
    pub fn wait_for_fragments(&self, stream: &str, count: usize, timeout: Duration) -> bool {
        let deadline = std::time::Instant::now() + timeout;
        loop {
            if self.state.ground_truth_len(stream) >= count {
                return true;
            }
            if std::time::Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Adds a stream while running (like `CreateStream`, but with a camera if the spec has one).
    pub fn add_stream(&self, spec: StreamSpec) -> Result<()> {
        spec.validate()?;
        store::State::add_stream(&self.state, spec)
    }

    /// The state of `stream`'s camera, if the stream exists and has one.
    pub fn camera_status(&self, stream: &str) -> Option<CameraStatus> {
        let streams = self.state.streams.lock();
        let camera = streams.get(stream)?.camera.as_ref()?;
        Some(CameraStatus {
            running: camera.is_running(),
            frames_encoded: camera.frames_encoded(),
            last_error: camera.last_error(),
        })
    }

    /// When the calls of API `operation` (`GetHLSStreamingSessionURL`, `GetDataEndpoint`, …)
    /// arrived, oldest first (the last 100,000 calls are kept): for measuring a client's retry
    /// delays end to end.
    pub fn api_call_times(&self, operation: &str) -> Vec<std::time::Instant> {
        self.state.api_call_times(operation)
    }

    /// Every HLS session token issued so far, oldest first: what a test searches logs, errors
    /// and Debug output for (raw and percent-encoded).
    pub fn issued_session_tokens(&self) -> Vec<String> {
        self.state.issued_tokens.lock().clone()
    }

    /// Counts of the requests served so far, by kind, and of the errors returned, by code.
    pub fn request_stats(&self) -> RequestStats {
        self.state.request_stats()
    }

    /// GetMedia counters of `stream` (connections open and the most at once, calls accepted
    /// and refused by the connection and call-rate limits, frames written), if it exists.
    pub fn get_media_stats(&self, stream: &str) -> Option<GetMediaStats> {
        self.state.get_media_stats(stream)
    }

    /// The producer timestamp of frame `frame_number` of `stream` (frame numbers are the ones
    /// in the picture's barcode), if the stream exists.
    pub fn frame_producer_time(&self, stream: &str, frame_number: u64) -> Option<SystemTime> {
        self.state.frame_producer_time(stream, frame_number)
    }

    /// Moves the clock that HLS session expiry is checked against forward by `by` (only that
    /// clock: fragments and timestamps keep real time). A test can so see a session expire
    /// (403 `NotAuthorizedException` "Streaming session token is expired") without waiting the
    /// 300 s minimum of `Expires`.
    pub fn advance_session_clock(&self, by: Duration) {
        self.state.advance_session_clock(by);
    }

    /// Refuses API `operation` from now on with `refusal` (`None`: serves it again); see
    /// [`EmulatorBuilder::refuse_api`]. An unknown operation name is an
    /// [`ErrorKind::InvalidConfig`] error.
    pub fn refuse_api(&self, operation: &str, refusal: Option<Refusal>) -> Result<()> {
        self.state.refusals.set(operation, refusal)
    }

    /// Stops the server and the cameras (also done on drop).
    pub fn shutdown(mut self) {
        self.stop();
    }

    fn stop(&mut self) {
        if let Some(server) = self.server.take() {
            server.stop();
        }
        self.state.stop_cameras();
    }
}

impl Drop for Emulator {
    fn drop(&mut self) {
        self.stop();
    }
}
