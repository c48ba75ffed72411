//! The options of a [`UriFrameSource`](super::UriFrameSource): the URI kinds, RTSP transport,
//! end-of-stream behaviour, and the builder.

use super::*;

/// What kind of URI a source reads, from its scheme.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum UriKind {
    /// `rtsp://` or `rtsps://`: a live camera (or relay), read with `rtspsrc`.
    Rtsp,
    /// `http://` or `https://`: an HLS playlist (`…m3u8`, live or VOD), read with
    /// `souphttpsrc` and `hlsdemux`. Other media that `urisourcebin` and `parsebin` read over HTTP work too.
    Http,
    /// `file://` or a plain path: a local media file (MP4, MKV, MPEG-TS, …).
    File,
}

impl UriKind {
    /// Lower-case name (`rtsp`, `http`, `file`).
    pub fn as_str(self) -> &'static str {
        match self {
            UriKind::Rtsp => "rtsp",
            UriKind::Http => "http",
            UriKind::File => "file",
        }
    }
}

/// How RTSP media travels (`rtspsrc`'s `protocols`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum RtspTransport {
    /// RTP interleaved in the RTSP TCP connection (default): no packet loss, passes NAT and
    /// firewalls, the usual choice for analytics.
    #[default]
    Tcp,
    /// RTP over UDP: lowest latency on a clean LAN; lost packets show as decode artefacts.
    Udp,
    /// UDP, falling back to TCP when no UDP packet arrives (`rtspsrc`'s own default).
    Auto,
}

impl RtspTransport {
    /// The `protocols` flags of `rtspsrc`.
    pub(super) fn protocols(self) -> &'static str {
        match self {
            RtspTransport::Tcp => "tcp",
            RtspTransport::Udp => "udp",
            RtspTransport::Auto => "udp+tcp",
        }
    }
}

/// What the source does when the stream ends (end-of-stream reaches the decoder's output).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EndOfStream {
    /// A live source ended unexpectedly: reconnect with backoff, like after an error (default
    /// for RTSP). Counted in `reconnects` and `read_errors`.
    Reconnect,
    /// The iterator ends after the last frame (default for files and HTTP).
    Finish,
    /// Start again from the beginning, at once (a new pipeline; `pts` starts again too): for
    /// test feeds and demos from a file.
    Loop,
}

impl EndOfStream {
    /// Lower-case name.
    pub fn as_str(self) -> &'static str {
        match self {
            EndOfStream::Reconnect => "reconnect",
            EndOfStream::Finish => "finish",
            EndOfStream::Loop => "loop",
        }
    }
}

/// Builder of a [`UriFrameSource`]; every option is validated by [`build`](Self::build).
#[derive(Clone)]
pub struct UriFrameSourceBuilder {
    uri: String,
    rtsp_transport: RtspTransport,
    rtsp_latency: Duration,
    end_of_stream: Option<EndOfStream>,
    realtime: bool,
    stall_timeout: Duration,
    delivery: Option<DeliveryPolicy>,
    common: CommonOptions,
}

impl std::fmt::Debug for UriFrameSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UriFrameSourceBuilder")
            .field("camera_id", &self.common.camera_id)
            .field("uri", &redact_url(&self.uri))
            .field("pixel_format", &self.common.pixel_format)
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

impl UriFrameSourceBuilder {
    pub(super) fn new(camera_id: &str, uri: &str) -> Self {
        UriFrameSourceBuilder {
            uri: uri.to_owned(),
            rtsp_transport: RtspTransport::Tcp,
            rtsp_latency: Duration::from_millis(200),
            end_of_stream: None,
            realtime: false,
            stall_timeout: Duration::from_secs(10),
            delivery: None,
            common: CommonOptions::new(camera_id),
        }
    }

    setter!(
        /// RTSP lower transport (default TCP). Ignored for other URIs.
        rtsp_transport: RtspTransport
    );
    setter!(
        /// RTSP jitter-buffer latency, 0–10 s (default 200 ms): how long packets may wait to
        /// be reordered; more absorbs network jitter, less lowers latency. Ignored for other
        /// URIs.
        rtsp_latency: Duration
    );
    /// What happens at end-of-stream (default: [`EndOfStream::Reconnect`] for RTSP,
    /// [`EndOfStream::Finish`] for HTTP and files).
    #[must_use]
    pub fn end_of_stream(mut self, action: EndOfStream) -> Self {
        self.end_of_stream = Some(action);
        self
    }
    setter!(
        /// Deliver frames at the media's own pace (the appsink synchronises on the clock)
        /// instead of as fast as they decode (default false). For files and HLS VOD, to
        /// simulate a live camera; live RTSP is paced by the camera anyway.
        realtime: bool
    );
    setter!(
        /// Reconnect when no frame has been decoded for this long although the reader keeps up,
        /// 1 s–600 s (default 10 s). It also bounds how long a connection may take to deliver
        /// its first frame.
        stall_timeout: Duration
    );
    /// Delivery policy (default: `DropOldest` when the source reconnects at end-of-stream,
    /// i.e. RTSP; `Block` for files and HTTP, so that nothing is dropped).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    common_setters!();

    fn validate(&self) -> Result<Target> {
        self.common.validate()?;
        let target = Target::parse(&self.uri)?;
        if self.rtsp_latency > Duration::from_secs(10) {
            return Err(Error::invalid_config(
                "rtsp_latency",
                format!("{:?}", self.rtsp_latency),
                "must be at most 10 s",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(600)).contains(&self.stall_timeout) {
            return Err(Error::invalid_config(
                "stall_timeout",
                format!("{:?}", self.stall_timeout),
                "must be between 1s and 600s",
            ));
        }
        Ok(target)
    }

    /// Validates every option (a file must exist), checks that GStreamer, a source element for
    /// the URI's scheme and the other elements the pipeline needs are installed, and starts
    /// reading in the background.
    pub fn build(self) -> Result<UriFrameSource> {
        let target = self.validate()?;
        // What the URI head plugs for each kind (H.264 and H.265 decoders, demuxers).
        let head: &[&str] = match target.kind {
            UriKind::Rtsp => &[
                "urisourcebin",
                "parsebin",
                "rtspsrc",
                "rtpjitterbuffer",
                "rtph264depay",
                "h264parse",
                "avdec_h264",
            ],
            UriKind::Http => &[
                "urisourcebin",
                "parsebin",
                "souphttpsrc",
                "hlsdemux",
                "typefind",
                "h264parse",
                "avdec_h264",
            ],
            UriKind::File => &[
                "urisourcebin",
                "parsebin",
                "filesrc",
                "typefind",
                "qtdemux",
                "h264parse",
                "avdec_h264",
            ],
        };
        self.common.require_elements(head)?;
        // The element urisourcebin will pick for the scheme (rtspsrc, souphttpsrc, filesrc, …).
        if let Err(e) = gst::Element::make_from_uri(gst::URIType::Src, &target.uri, None) {
            return Err(Error::new(
                ErrorKind::Pipeline,
                format!(
                    "no GStreamer source element for {}: {e} (install gstreamer1.0-plugins-good)",
                    target.display
                ),
            ));
        }
        let end_of_stream = self.end_of_stream.unwrap_or(match target.kind {
            UriKind::Rtsp => EndOfStream::Reconnect,
            UriKind::Http | UriKind::File => EndOfStream::Finish,
        });
        let policy = self.delivery.unwrap_or(match end_of_stream {
            EndOfStream::Reconnect => DeliveryPolicy::DropOldest,
            EndOfStream::Finish | EndOfStream::Loop => DeliveryPolicy::Block,
        });
        let core = Arc::new(
            Core::new(Queue::new(
                self.common.queue_capacity,
                self.common.queue_bytes,
                policy,
            ))
            .counting_into(self.common.metrics.clone(), &self.common.camera_id),
        );
        let ctx = Arc::new(Ctx {
            camera_id: self.common.camera_id.clone(),
            display: target.display.clone(),
            kind: target.kind,
            core: Arc::clone(&core),
            metrics: self.common.metrics.clone(),
            stop: AtomicBool::new(false),
            stop_notify: Notify::new(),
            sequence: AtomicU64::new(0),
            last_progress: Mutex::new(Instant::now()),
            connection_frames: AtomicU64::new(0),
            pipeline: Mutex::new(None),
            pipelines_built: AtomicU64::new(0),
        });
        if let Some(m) = &ctx.metrics {
            m.init_camera(&ctx.camera_id);
        }
        let handle = self.common.runtime_handle()?;
        ctx.set_state(SourceState::Connecting);
        let opts = Options {
            target,
            end_of_stream,
            decode: self.common.decode_config(),
            rtsp_transport: self.rtsp_transport,
            rtsp_latency: self.rtsp_latency,
            realtime: self.realtime,
            stall_timeout: self.stall_timeout,
            backoff: self.common.backoff,
        };
        tracing::debug!(camera = %ctx.camera_id, uri = %ctx.display, kind = ctx.kind.as_str(), "URI source starting");
        let task = handle.spawn(run(Arc::clone(&ctx), opts));
        Ok(UriFrameSource {
            ctx,
            core,
            task: Mutex::new(Some(task)),
        })
    }
}
