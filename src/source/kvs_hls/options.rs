//! The options of a [`KvsHlsFrameSource`]: its builder and the enums of the KVS session
//! parameters.

use super::*;

/// `PlaybackMode` of the HLS session.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PlaybackMode {
    /// The live edge: the newest fragments as they are ingested (default).
    Live,
    /// From `start`, then live (fragments are added at real-time pace); ends at `end` if given.
    LiveReplay {
        /// First fragment start (inclusive).
        start: SystemTime,
        /// Last fragment start (inclusive), or open-ended.
        end: Option<SystemTime>,
    },
    /// An archived range; the iterator ends after its last frame. At most 24 h.
    OnDemand {
        /// First fragment start (inclusive).
        start: SystemTime,
        /// Last fragment start (inclusive).
        end: SystemTime,
    },
}

/// `FragmentSelectorType`: which clock timestamps and ranges refer to.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum TimestampSelector {
    /// The camera's clock (default here; KVS's default is SERVER).
    #[default]
    Producer,
    /// KVS's ingest clock.
    Server,
}

/// `ContainerFormat` of the HLS fragments.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Container {
    /// fMP4 (default, less overhead).
    #[default]
    FragmentedMp4,
    /// MPEG-TS (5–25 % more bytes): each segment is demuxed by the reader and its access units
    /// decoded with their presentation times; the video stream (H.264 or H.265) only.
    MpegTs,
}

/// `DiscontinuityMode` of the HLS session (the reader does not depend on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DiscontinuityMode {
    /// A discontinuity tag before every fragment.
    Always,
    /// None.
    Never,
    /// Where fragments have gaps or overlaps above 50 ms.
    OnDiscontinuity,
}

/// Where a KVS source gets its client.
#[derive(Clone)]
pub(crate) enum ClientSource {
    Env { region: Option<String> },
    Config(Box<aws_config::SdkConfig>),
    Client(KvsClient),
}

impl ClientSource {
    /// The client: the shared one, one from the configuration, or one from the environment.
    pub(crate) async fn resolve(&self) -> Result<KvsClient> {
        match self {
            ClientSource::Client(c) => Ok(c.clone()),
            ClientSource::Config(config) => Ok(KvsClient::new(config)),
            ClientSource::Env { region } => KvsClient::from_env(region.as_deref()).await,
        }
    }
}

/// `region`, `sdk_config` and `client` of a KVS source's builder (a `client: ClientSource`
/// field).
macro_rules! client_setters {
    () => {
        /// AWS region (default: the configured one). Ignored with [`sdk_config`](Self::sdk_config)
        /// or [`client`](Self::client).
        #[must_use]
        pub fn region(mut self, region: impl Into<String>) -> Self {
            self.client = ClientSource::Env {
                region: Some(region.into()),
            };
            self
        }
        /// Use this AWS SDK configuration (credentials, region, endpoint) instead of the
        /// environment's, e.g. `Emulator::sdk_config()`.
        #[must_use]
        pub fn sdk_config(mut self, config: &aws_config::SdkConfig) -> Self {
            self.client = ClientSource::Config(Box::new(config.clone()));
            self
        }
        /// Share a [`KvsClient`] (and its endpoint cache) with other sources.
        #[must_use]
        pub fn client(mut self, client: KvsClient) -> Self {
            self.client = ClientSource::Client(client);
            self
        }
    };
}
pub(crate) use client_setters;

/// Builder of a [`KvsHlsFrameSource`]; every option is validated by [`build`](Self::build).
#[derive(Clone)]
pub struct KvsHlsFrameSourceBuilder {
    pub(super) stream: StreamId,
    pub(super) client: ClientSource,
    pub(super) playback: PlaybackMode,
    pub(super) selector: TimestampSelector,
    pub(super) container: Container,
    pub(super) discontinuity: Option<DiscontinuityMode>,
    pub(super) display_timestamps: bool,
    pub(super) expires: Duration,
    pub(super) max_playlist_fragments: Option<u32>,
    pub(super) refresh_margin: Duration,
    pub(super) poll_interval: Duration,
    pub(super) request_timeout: Duration,
    pub(super) stall_timeout: Duration,
    pub(super) delivery: Option<DeliveryPolicy>,
    pub(super) common: CommonOptions,
}

impl std::fmt::Debug for KvsHlsFrameSourceBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KvsHlsFrameSourceBuilder")
            .field("camera_id", &self.common.camera_id)
            .field("stream", &self.stream)
            .field("playback", &self.playback)
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

impl KvsHlsFrameSourceBuilder {
    pub(super) fn new(camera_id: &str, stream: StreamId) -> Self {
        KvsHlsFrameSourceBuilder {
            stream,
            client: ClientSource::Env { region: None },
            playback: PlaybackMode::Live,
            selector: TimestampSelector::Producer,
            container: Container::FragmentedMp4,
            discontinuity: None,
            display_timestamps: true,
            expires: Duration::from_secs(3600),
            max_playlist_fragments: None,
            refresh_margin: Duration::from_secs(30),
            poll_interval: Duration::from_secs(1),
            request_timeout: Duration::from_secs(10),
            stall_timeout: Duration::from_secs(30),
            delivery: None,
            common: CommonOptions::new(camera_id),
        }
    }

    client_setters!();
    setter!(
        /// Playback mode (default LIVE).
        playback: PlaybackMode
    );
    setter!(
        /// Fragment selector (default PRODUCER_TIMESTAMP).
        selector: TimestampSelector
    );
    setter!(
        /// Container format (default FRAGMENTED_MP4).
        container: Container
    );
    /// `DiscontinuityMode` (default: KVS's default for the selector).
    #[must_use]
    pub fn discontinuity_mode(mut self, mode: DiscontinuityMode) -> Self {
        self.discontinuity = Some(mode);
        self
    }
    setter!(
        /// `DisplayFragmentTimestamp=ALWAYS` (default true). Without it frames have no producer
        /// time, fragments cannot be matched across sessions, and the timestamp is the emit time.
        display_timestamps: bool
    );
    setter!(
        /// Session lifetime, `Expires`: 300 s–43200 s (default 3600 s).
        expires: Duration
    );
    /// `MaxMediaPlaylistFragmentResults`, 1–5000: how many fragments a playlist lists (default
    /// 30 for LIVE and LIVE_REPLAY, KVS's 1000 for ON_DEMAND).
    ///
    /// A LIVE playlist holds the newest N fragments, and fragments that leave it before they are
    /// fetched are lost (counted in `fragments_skipped`). KVS's default of 5 (10 s of 2 s
    /// fragments) is shorter than an ordinary recovery (quick retries, then a 5 s backoff ×
    /// 0.8–1.2, a new session); 30 (60 s of 2 s fragments, 30 s of 1 s ones) holds the quick
    /// retries and the first two backoff delays (≈ 2 + 6 + 12 s), so ordinary faults lose
    /// nothing, while costing 30 of the stream's 10,000 fragment-metadata points per poll (0.3 %
    /// at one poll a second). Latency does not grow: LIVE starts at the newest fragment.
    #[must_use]
    pub fn max_playlist_fragments(mut self, n: u32) -> Self {
        self.max_playlist_fragments = Some(n);
        self
    }
    setter!(
        /// A new session is opened this long before the current one expires (default 30 s;
        /// less than `expires`).
        refresh_margin: Duration
    );
    setter!(
        /// Media playlist poll period, 200 ms–10 s (default 1 s; KVS allows 5 playlist
        /// requests per second per session).
        poll_interval: Duration
    );
    setter!(
        /// Time limit of each playlist or fragment request, 1 s–120 s (default 10 s).
        request_timeout: Duration
    );
    setter!(
        /// Reconnect when no frame has been decoded for this long although the reader keeps up,
        /// 1 s–600 s (default 30 s).
        stall_timeout: Duration
    );
    /// Delivery policy (default: `DropOldest` for LIVE, `Block` for the others).
    #[must_use]
    pub fn delivery(mut self, policy: DeliveryPolicy) -> Self {
        self.delivery = Some(policy);
        self
    }
    common_setters!();

    fn validate(&self) -> Result<()> {
        self.common.validate()?;
        self.stream.validate()?;
        if !(Duration::from_secs(300)..=Duration::from_secs(43_200)).contains(&self.expires) {
            return Err(Error::invalid_config(
                "expires",
                format!("{:?}", self.expires),
                "must be between 300 s and 43200 s",
            ));
        }
        if self.refresh_margin >= self.expires {
            return Err(Error::invalid_config(
                "refresh_margin",
                format!("{:?}", self.refresh_margin),
                "must be less than `expires`",
            ));
        }
        if let Some(n) = self.max_playlist_fragments
            && !(1..=5000).contains(&n)
        {
            return Err(Error::invalid_config(
                "max_playlist_fragments",
                n,
                "must be between 1 and 5000",
            ));
        }
        let range = |start: SystemTime, end: SystemTime| -> Result<()> {
            match end.duration_since(start) {
                Ok(d) if !d.is_zero() && d <= Duration::from_secs(24 * 3600) => Ok(()),
                _ => Err(Error::invalid_config(
                    "playback",
                    format!("{:?}", self.playback),
                    "the range must end after it starts and last at most 24 h",
                )),
            }
        };
        match self.playback {
            PlaybackMode::Live => {}
            PlaybackMode::LiveReplay { start, end } => {
                if let Some(end) = end {
                    range(start, end)?;
                }
            }
            PlaybackMode::OnDemand { start, end } => range(start, end)?,
        }
        if let Some(age) = self.common.max_frame_age
            && self.playback != PlaybackMode::Live
        {
            return Err(Error::invalid_config(
                "max_frame_age",
                format!("{age:?}"),
                "keeps a LIVE reader at the live edge; with a past range every frame would be too old",
            ));
        }
        let within = |name: &str, v: Duration, lo: Duration, hi: Duration| -> Result<()> {
            if (lo..=hi).contains(&v) {
                Ok(())
            } else {
                Err(Error::invalid_config(
                    name,
                    format!("{v:?}"),
                    &format!("must be between {lo:?} and {hi:?}"),
                ))
            }
        };
        within(
            "poll_interval",
            self.poll_interval,
            Duration::from_millis(200),
            Duration::from_secs(10),
        )?;
        within(
            "request_timeout",
            self.request_timeout,
            Duration::from_secs(1),
            Duration::from_secs(120),
        )?;
        within(
            "stall_timeout",
            self.stall_timeout,
            Duration::from_secs(1),
            Duration::from_secs(600),
        )?;
        Ok(())
    }

    /// Validates every option, builds the decode pipeline (a missing GStreamer plugin is
    /// reported here) and starts reading in the background.
    pub fn build(self) -> Result<KvsHlsFrameSource> {
        self.validate()?;
        self.common
            .require_elements(crate::decode::KVS_HEAD_ELEMENTS)?;
        let policy = self.delivery.unwrap_or(match self.playback {
            PlaybackMode::Live => DeliveryPolicy::DropOldest,
            _ => DeliveryPolicy::Block,
        });
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
        let head = match self.container {
            Container::FragmentedMp4 => crate::decode::Head::Fmp4,
            Container::MpegTs => crate::decode::Head::Elementary,
        };
        let decoder = Arc::new(Decoder::start_with(
            self.common.decode_config(),
            sink,
            head,
        )?);
        let handle = self.common.runtime_handle()?;
        ctx.set_state(SourceState::Connecting);
        let task = handle.spawn(run(Arc::clone(&ctx), Arc::clone(&decoder), self));
        Ok(KvsHlsFrameSource {
            ctx,
            core,
            decoder,
            task: Mutex::new(Some(task)),
        })
    }
}
