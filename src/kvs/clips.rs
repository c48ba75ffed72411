//! Clip extraction: any time range of a stream as one playable MP4 file (KVS `GetClip`).
//!
//! One `GetClip` call returns at most 200 fragments or 100 MB. [`ClipExtractor`] therefore
//! plans first and downloads second:
//!
//! 1. `DescribeStream`: a stream that is not ACTIVE is refused with a typed error
//!    ([`ErrorKind::StreamNotFound`], the message names the status) before anything is written.
//! 2. `ListFragments` over `[start − max_fragment_duration, end]` (every page), sorted by the
//!    selected timestamp (KVS returns them in no particular order), duplicates removed. The
//!    fragment that *contains* `start` is kept (KVS's `GetClip` would miss it: it only returns
//!    fragments that start inside the range), then every fragment that starts in `[start, end]`.
//!    None → [`ErrorKind::NoFragments`].
//! 3. The fragments are cut into chunks of at most 200 fragments and 100 MB
//!    ([`ClipOptions::max_fragments_per_call`], [`ClipOptions::max_bytes_per_call`]); one
//!    `GetClip` per chunk over `[first fragment start, last fragment start]`, so that consecutive
//!    calls neither overlap nor leave a gap. Each response is streamed to a part file.
//! 4. Each part is demuxed by GStreamer (`qtdemux`) and its video samples are appended, re-timed
//!    to follow the previous part, to one `mp4mux` (no re-encoding). If a part holds fewer
//!    fragments than asked (KVS cut it short), the next call starts at the first missing one.
//! 5. The file is written to a hidden work directory next to the destination and renamed into
//!    place when complete: the final name never holds a partial clip, whatever fails (or if the
//!    future is dropped).
//!
//! Memory stays bounded whatever the clip size: bodies are streamed to disk and GStreamer's
//! queues are bounded. Disk needs about twice the clip size while it is written (the part being
//! joined, the clip, and `mp4mux`'s `faststart` temporary file that puts the index first).
//!
//! Only the video track is kept. All fragments of a clip must share one codec configuration
//! (SPS/PPS): a clip across a resolution change fails with [`ErrorKind::UnsupportedMedia`].
//!
//! ```no_run
//! use std::time::{Duration, SystemTime};
//! use kvs_frames::kvs::{ClipExtractor, ClipOptions, ClipRequest, KvsClient};
//!
//! # async fn example() -> kvs_frames::Result<()> {
//! let client = KvsClient::from_env(None).await?;
//! let clips = ClipExtractor::new(client, ClipOptions::default())?;
//! let end = SystemTime::now() - Duration::from_secs(5);
//! let request = ClipRequest::new("cam-1", end - Duration::from_secs(60), end).thumbnail(true);
//! let clip = clips.extract_to_file(&request, "out/cam-1/last-minute.mp4").await?;
//! tracing::info!("{} frames, {:?}, {} GetClip calls", clip.frames, clip.media_duration, clip.get_clip_calls);
//! # Ok(()) }
//! ```

use crate::elements::{make, make_with};
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types::{
    ClipFragmentSelector, ClipFragmentSelectorType, Fragment, FragmentSelector,
    FragmentSelectorType, TimestampRange,
};
use aws_smithy_types::DateTime;
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tokio::io::AsyncWriteExt;

use super::client::{KvsClient, StreamId};
use super::discovery::{Backoff, describe_stream, retry};
use crate::error::{Error, ErrorKind, Result};

/// GetClip returns at most this many fragments per call.
pub const GET_CLIP_MAX_FRAGMENTS: usize = 200;
/// GetClip returns at most "100 MB" per call; whether KVS means 10^8 or 2^20·100 bytes is not
/// documented, so the default limit is the smaller one.
pub const GET_CLIP_MAX_BYTES: u64 = 100_000_000;
/// KVS fragments last at most 20 s (`MAX_FRAGMENT_DURATION_REACHED` beyond).
pub const MAX_FRAGMENT_DURATION: Duration = Duration::from_secs(20);
/// A GetClip range must not be longer than 24 h.
const GET_CLIP_MAX_RANGE: Duration = Duration::from_secs(24 * 3600 - 1);
/// `ListFragments` `MaxResults` is 1–1000.
const LIST_FRAGMENTS_MAX_RESULTS: u32 = 1000;
/// A guard against endless pagination.
const MAX_PAGES: u32 = 100_000;
/// How long a GStreamer step may wait for data before it is declared stuck.
const GST_TIMEOUT: gst::ClockTime = gst::ClockTime::from_seconds(120);
/// Suffix of the hidden work directories (see [`crate::retention`], which removes stale ones).
pub(crate) const WORK_DIR_SUFFIX: &str = ".kvs-clip-tmp";

/// Which timestamps select the fragments (`FragmentSelectorType`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum TimestampSelector {
    /// `PRODUCER_TIMESTAMP` (default): the time the camera captured the media. Choose it for
    /// "what happened between 12:00 and 12:01".
    #[default]
    Producer,
    /// `SERVER_TIMESTAMP`: the time KVS received the fragment. Choose it when producer clocks
    /// are not trustworthy.
    Server,
}

impl TimestampSelector {
    /// The KVS spelling.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            TimestampSelector::Producer => "PRODUCER_TIMESTAMP",
            TimestampSelector::Server => "SERVER_TIMESTAMP",
        }
    }

    fn fragment_selector(self) -> FragmentSelectorType {
        match self {
            TimestampSelector::Producer => FragmentSelectorType::ProducerTimestamp,
            TimestampSelector::Server => FragmentSelectorType::ServerTimestamp,
        }
    }

    fn clip_selector(self) -> ClipFragmentSelectorType {
        match self {
            TimestampSelector::Producer => ClipFragmentSelectorType::ProducerTimestamp,
            TimestampSelector::Server => ClipFragmentSelectorType::ServerTimestamp,
        }
    }
}

/// What to extract: a stream and a time range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipRequest {
    stream: StreamId,
    start: SystemTime,
    end: SystemTime,
    selector: TimestampSelector,
    include_fragment_at_start: bool,
    thumbnail: bool,
}

impl ClipRequest {
    /// The media of `stream` between `start` and `end` (producer time by default).
    ///
    /// The clip begins with the fragment that contains `start` (its first frame is a key frame
    /// at or before `start`, see [`include_fragment_at_start`](Self::include_fragment_at_start))
    /// and ends with the last fragment that starts at or before `end` (so it may run past `end`
    /// by up to one fragment). Clips are never trimmed: that would need re-encoding.
    pub fn new(stream: impl Into<StreamId>, start: SystemTime, end: SystemTime) -> Self {
        ClipRequest {
            stream: stream.into(),
            start,
            end,
            selector: TimestampSelector::Producer,
            include_fragment_at_start: true,
            thumbnail: false,
        }
    }

    /// Which timestamps `start` and `end` refer to (default producer time).
    #[must_use]
    pub fn selector(mut self, selector: TimestampSelector) -> Self {
        self.selector = selector;
        self
    }

    /// Whether the fragment that started before `start` and is still running at `start` is
    /// included (default true). Set it to false for back-to-back windows `[t0, t1)`, `[t1, t2)`
    /// with `end = t1 − 1 ms`: every fragment then lands in exactly one clip, the one in which
    /// it starts.
    #[must_use]
    pub fn include_fragment_at_start(mut self, include: bool) -> Self {
        self.include_fragment_at_start = include;
        self
    }

    /// Also make a JPEG of the clip's first frame (default false): next to the file
    /// (`{name}.jpg`) with [`ClipExtractor::extract_to_file`], in
    /// [`ClipBytes::thumbnail_jpeg`] with [`ClipExtractor::extract_to_bytes`].
    #[must_use]
    pub fn thumbnail(mut self, enabled: bool) -> Self {
        self.thumbnail = enabled;
        self
    }

    /// The stream.
    #[must_use]
    pub fn stream(&self) -> &StreamId {
        &self.stream
    }

    /// Start of the range.
    #[must_use]
    pub fn start(&self) -> SystemTime {
        self.start
    }

    /// End of the range (inclusive: compared with fragment start times).
    #[must_use]
    pub fn end(&self) -> SystemTime {
        self.end
    }

    fn validate(&self) -> Result<()> {
        self.stream.validate()?;
        if self.end <= self.start {
            return Err(Error::invalid_config(
                "ClipRequest::end",
                format_time(self.end),
                "must be later than the start",
            ));
        }
        if self.start < UNIX_EPOCH {
            return Err(Error::invalid_config(
                "ClipRequest::start",
                "before 1970",
                "must be after the Unix epoch",
            ));
        }
        Ok(())
    }
}

/// Options of a [`ClipExtractor`]: plain values with by-value setters, validated by
/// [`ClipExtractor::new`].
#[derive(Clone, Debug)]
pub struct ClipOptions {
    max_fragments_per_call: usize,
    max_bytes_per_call: u64,
    max_fragment_duration: Duration,
    list_page_size: u32,
    check_stream_status: bool,
    work_dir: Option<PathBuf>,
    max_attempts: u32,
    initial_backoff: Duration,
    max_backoff: Duration,
}

impl Default for ClipOptions {
    /// 200 fragments and 10^8 bytes per GetClip call, 20 s look-back for the fragment that
    /// contains the start, ListFragments pages of 1000, stream status checked, work files of
    /// [`extract_to_bytes`](ClipExtractor::extract_to_bytes) in the system temporary directory,
    /// 5 attempts per call with backoff from 200 ms to 5 s.
    fn default() -> Self {
        ClipOptions {
            max_fragments_per_call: GET_CLIP_MAX_FRAGMENTS,
            max_bytes_per_call: GET_CLIP_MAX_BYTES,
            max_fragment_duration: MAX_FRAGMENT_DURATION,
            list_page_size: LIST_FRAGMENTS_MAX_RESULTS,
            check_stream_status: true,
            work_dir: None,
            max_attempts: 5,
            initial_backoff: Duration::from_millis(200),
            max_backoff: Duration::from_secs(5),
        }
    }
}

impl ClipOptions {
    /// Fragments per GetClip call (1–200, default 200: KVS's limit).
    #[must_use]
    pub fn max_fragments_per_call(mut self, max: usize) -> Self {
        self.max_fragments_per_call = max;
        self
    }

    /// Bytes (sum of `FragmentSizeInBytes`) per GetClip call (1 up to 100 MiB, default
    /// 10^8). A single fragment larger than this still gets its own call.
    #[must_use]
    pub fn max_bytes_per_call(mut self, max: u64) -> Self {
        self.max_bytes_per_call = max;
        self
    }

    /// How far before `start` to look for the fragment that contains it (1 s–60 s, default
    /// 20 s: KVS's longest fragment). Use your producers' real fragment duration plus a margin
    /// to list fewer fragments.
    #[must_use]
    pub fn max_fragment_duration(mut self, duration: Duration) -> Self {
        self.max_fragment_duration = duration;
        self
    }

    /// `MaxResults` of each ListFragments page (1–1000, default 1000).
    #[must_use]
    pub fn list_page_size(mut self, size: u32) -> Self {
        self.list_page_size = size;
        self
    }

    /// Whether to call `DescribeStream` first and refuse streams that are not ACTIVE (default
    /// true). Turn it off when the stream comes from [`Discovery`](super::Discovery), which only
    /// returns ACTIVE streams, to save one call per clip.
    #[must_use]
    pub fn check_stream_status(mut self, check: bool) -> Self {
        self.check_stream_status = check;
        self
    }

    /// Directory for the work files of [`extract_to_bytes`](ClipExtractor::extract_to_bytes)
    /// (default: the system temporary directory). `extract_to_file` always works next to its
    /// destination, so that the final rename is atomic.
    #[must_use]
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    /// Attempts per KVS call when it is throttled or fails transiently (default 5).
    #[must_use]
    pub fn max_attempts(mut self, attempts: u32) -> Self {
        self.max_attempts = attempts;
        self
    }

    /// Backoff before the first retry and its cap (defaults 200 ms and 5 s), doubling, with a
    /// random factor of 0.8–1.2.
    #[must_use]
    pub fn backoff(mut self, initial: Duration, max: Duration) -> Self {
        self.initial_backoff = initial;
        self.max_backoff = max;
        self
    }

    fn validate(&self) -> Result<Backoff> {
        if !(1..=GET_CLIP_MAX_FRAGMENTS).contains(&self.max_fragments_per_call) {
            return Err(Error::invalid_config(
                "ClipOptions::max_fragments_per_call",
                self.max_fragments_per_call,
                "GetClip returns 1-200 fragments",
            ));
        }
        if !(1..=100 * 1024 * 1024).contains(&self.max_bytes_per_call) {
            return Err(Error::invalid_config(
                "ClipOptions::max_bytes_per_call",
                self.max_bytes_per_call,
                "GetClip returns at most 100 MB",
            ));
        }
        if !(Duration::from_secs(1)..=Duration::from_secs(60)).contains(&self.max_fragment_duration)
        {
            return Err(Error::invalid_config(
                "ClipOptions::max_fragment_duration",
                format!("{:?}", self.max_fragment_duration),
                "must be 1 s to 60 s",
            ));
        }
        if !(1..=LIST_FRAGMENTS_MAX_RESULTS).contains(&self.list_page_size) {
            return Err(Error::invalid_config(
                "ClipOptions::list_page_size",
                self.list_page_size,
                "ListFragments MaxResults is 1-1000",
            ));
        }
        Backoff::new(
            self.max_attempts,
            self.initial_backoff,
            self.max_backoff,
            "ClipOptions",
        )
    }
}

/// One fragment as `ListFragments` describes it.
#[non_exhaustive]
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FragmentInfo {
    /// `FragmentNumber` (a decimal string that grows with ingestion order).
    pub number: String,
    /// `ProducerTimestamp`: start of the fragment on the camera's clock.
    pub producer_timestamp: SystemTime,
    /// `ServerTimestamp`: start of the fragment on KVS's clock.
    pub server_timestamp: SystemTime,
    /// `FragmentLengthInMilliseconds`.
    pub duration: Duration,
    /// `FragmentSizeInBytes`.
    pub size_bytes: u64,
}

impl FragmentInfo {
    /// The start time of the fragment for `selector`.
    #[must_use]
    pub fn start(&self, selector: TimestampSelector) -> SystemTime {
        match selector {
            TimestampSelector::Producer => self.producer_timestamp,
            TimestampSelector::Server => self.server_timestamp,
        }
    }

    fn from_sdk(f: &Fragment) -> Result<Self> {
        let time = |t: Option<&DateTime>, what: &str| {
            t.and_then(to_millis).ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    format!("ListFragments returned a fragment without a valid {what}"),
                )
            })
        };
        let number = f
            .fragment_number()
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Error::new(
                    ErrorKind::Protocol,
                    "ListFragments returned a fragment without a FragmentNumber",
                )
            })?
            .to_owned();
        Ok(FragmentInfo {
            producer_timestamp: time(f.producer_timestamp(), "ProducerTimestamp")?,
            server_timestamp: time(f.server_timestamp(), "ServerTimestamp")?,
            duration: Duration::from_millis(
                u64::try_from(f.fragment_length_in_milliseconds()).unwrap_or(0),
            ),
            size_bytes: u64::try_from(f.fragment_size_in_bytes()).unwrap_or(0),
            number,
        })
    }

    fn number_key(&self) -> (usize, &str) {
        (self.number.len(), self.number.as_str())
    }
}

/// What was extracted.
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct ClipInfo {
    /// The stream.
    pub stream: StreamId,
    /// Where the clip was written ([`ClipExtractor::extract_to_file`]).
    pub path: Option<PathBuf>,
    /// Where the thumbnail was written, if one was asked for and made.
    pub thumbnail_path: Option<PathBuf>,
    /// Why the thumbnail could not be made, if it was asked for and failed (the clip itself is
    /// fine then).
    pub thumbnail_error: Option<Error>,
    /// Size of the MP4 file.
    pub size_bytes: u64,
    /// KVS fragments in the clip.
    pub fragments: usize,
    /// `GetClip` calls made.
    pub get_clip_calls: usize,
    /// Video frames (samples) in the clip.
    pub frames: u64,
    /// Duration of the clip's video.
    pub media_duration: Duration,
    /// Start (for the request's selector) of the first fragment: the clip's first frame.
    pub first_fragment_start: SystemTime,
    /// Start of the last fragment plus its duration.
    pub last_fragment_end: SystemTime,
    /// `FragmentNumber` of the first fragment.
    pub first_fragment_number: String,
    /// `FragmentNumber` of the last fragment.
    pub last_fragment_number: String,
}

/// A clip held in memory ([`ClipExtractor::extract_to_bytes`]).
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct ClipBytes {
    /// The MP4 file.
    pub mp4: Vec<u8>,
    /// The JPEG of the first frame, when asked for and made.
    pub thumbnail_jpeg: Option<Vec<u8>>,
    /// What was extracted.
    pub info: ClipInfo,
}

/// Extracts clips of any length with `ListFragments` + `GetClip`, joined with GStreamer (see the
/// [module docs](self)). Cheap to share by reference; one per process is enough.
pub struct ClipExtractor {
    client: KvsClient,
    options: ClipOptions,
    backoff: Backoff,
}

impl fmt::Debug for ClipExtractor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClipExtractor")
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl ClipExtractor {
    /// An extractor over `client`; fails with [`ErrorKind::InvalidConfig`] for invalid options
    /// and [`ErrorKind::Pipeline`] when GStreamer cannot be initialised or lacks an element
    /// that joining or thumbnails need (named with its Debian package).
    pub fn new(client: KvsClient, options: ClipOptions) -> Result<Self> {
        let backoff = options.validate()?;
        crate::elements::require(CLIP_ELEMENTS)?;
        Ok(ClipExtractor {
            client,
            options,
            backoff,
        })
    }

    /// Its options.
    #[must_use]
    pub fn options(&self) -> &ClipOptions {
        &self.options
    }

    /// The fragments the clip of `request` would hold, oldest first (steps 1–2 of the
    /// [module docs](self)): an error if the stream is not ACTIVE or the range has none.
    pub async fn fragments(&self, request: &ClipRequest) -> Result<Vec<FragmentInfo>> {
        request.validate()?;
        self.plan(request)
            .await
            .map_err(|e| e.context(format!("clip of stream {}", request.stream)))
    }

    /// Extracts the clip into `path` (parent directories are created). The file appears only
    /// when complete (written next to it, then renamed); with
    /// [`thumbnail`](ClipRequest::thumbnail) the JPEG `path.with_extension("jpg")` appears just
    /// before it.
    pub async fn extract_to_file(
        &self,
        request: &ClipRequest,
        path: impl AsRef<Path>,
    ) -> Result<ClipInfo> {
        let path = path.as_ref();
        self.extract_to_file_inner(request, path)
            .await
            .map_err(|e| {
                e.context(format!(
                    "clip of stream {} to {}",
                    request.stream,
                    path.display()
                ))
            })
    }

    async fn extract_to_file_inner(&self, request: &ClipRequest, path: &Path) -> Result<ClipInfo> {
        request.validate()?;
        let file_name = path
            .file_name()
            .and_then(|n| n.to_str())
            .filter(|n| !n.is_empty())
            .ok_or_else(|| {
                Error::invalid_config("path", path.display(), "must name a file (UTF-8)")
            })?;
        let parent = match path.parent() {
            Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
            _ => PathBuf::from("."),
        };
        let plan = self.plan(request).await?;
        tokio::fs::create_dir_all(&parent).await.map_err(|e| {
            Error::from(e).context(format!("creating directory {}", parent.display()))
        })?;
        let work = WorkDir::create(&parent, file_name).await?;
        let (mut info, keyframe) = self.download_and_join(request, &plan, &work).await?;
        let clip_tmp = work.clip_path();
        if request.thumbnail {
            let thumbnail_path = path.with_extension("jpg");
            match thumbnail(keyframe).await {
                Ok(jpeg) => {
                    let tmp = work.path.join("thumbnail.jpg");
                    tokio::fs::write(&tmp, &jpeg).await?;
                    tokio::fs::rename(&tmp, &thumbnail_path).await?;
                    info.thumbnail_path = Some(thumbnail_path);
                }
                Err(err) => {
                    tracing::warn!(stream = %request.stream, error = %err, "clip thumbnail failed");
                    info.thumbnail_error = Some(err);
                }
            }
        }
        let file = tokio::fs::File::open(&clip_tmp).await?;
        file.sync_all().await?;
        info.size_bytes = file.metadata().await?.len();
        drop(file);
        tokio::fs::rename(&clip_tmp, path).await.map_err(|e| {
            Error::from(e).context(format!("renaming the finished clip to {}", path.display()))
        })?;
        info.path = Some(path.to_path_buf());
        drop(work);
        tracing::debug!(
            stream = %request.stream,
            path = %path.display(),
            fragments = info.fragments,
            frames = info.frames,
            bytes = info.size_bytes,
            calls = info.get_clip_calls,
            "clip written"
        );
        Ok(info)
    }

    /// Extracts the clip into memory (work files go to [`ClipOptions::work_dir`] and are removed
    /// afterwards).
    pub async fn extract_to_bytes(&self, request: &ClipRequest) -> Result<ClipBytes> {
        self.extract_to_bytes_inner(request)
            .await
            .map_err(|e| e.context(format!("clip of stream {}", request.stream)))
    }

    async fn extract_to_bytes_inner(&self, request: &ClipRequest) -> Result<ClipBytes> {
        request.validate()?;
        let plan = self.plan(request).await?;
        let parent = self
            .options
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        tokio::fs::create_dir_all(&parent).await?;
        let work = WorkDir::create(&parent, "clip").await?;
        let (mut info, keyframe) = self.download_and_join(request, &plan, &work).await?;
        let mp4 = tokio::fs::read(work.clip_path()).await?;
        info.size_bytes = mp4.len() as u64;
        drop(work);
        let thumbnail_jpeg = if request.thumbnail {
            match thumbnail(keyframe).await {
                Ok(jpeg) => Some(jpeg),
                Err(err) => {
                    tracing::warn!(stream = %request.stream, error = %err, "clip thumbnail failed");
                    info.thumbnail_error = Some(err);
                    None
                }
            }
        } else {
            None
        };
        Ok(ClipBytes {
            mp4,
            thumbnail_jpeg,
            info,
        })
    }

    /// Status check, ListFragments, selection.
    async fn plan(&self, request: &ClipRequest) -> Result<Vec<FragmentInfo>> {
        if self.options.check_stream_status {
            let details = describe_stream(&self.client, &self.backoff, &request.stream).await?;
            if !details.status.is_active() {
                return Err(Error::new(
                    ErrorKind::StreamNotFound,
                    format!(
                        "stream {} is not ACTIVE (status {}): no clip can be extracted",
                        request.stream, details.status
                    ),
                ));
            }
        }
        let from = if request.include_fragment_at_start {
            request
                .start
                .checked_sub(self.options.max_fragment_duration)
                .unwrap_or(UNIX_EPOCH)
                .max(UNIX_EPOCH)
        } else {
            request.start
        };
        let listed = self.list_fragments(request, from, request.end).await?;
        let listed_count = listed.len();
        let plan = select_fragments(
            listed,
            request.start,
            request.end,
            request.selector,
            request.include_fragment_at_start,
        );
        tracing::debug!(
            stream = %request.stream,
            listed = listed_count,
            selected = plan.len(),
            "ListFragments"
        );
        if plan.is_empty() {
            return Err(Error::new(
                ErrorKind::NoFragments,
                format!(
                    "no fragments in stream {} between {} and {} ({})",
                    request.stream,
                    format_time(request.start),
                    format_time(request.end),
                    request.selector.as_str()
                ),
            ));
        }
        Ok(plan)
    }

    /// Every ListFragments page of `[from, to]`.
    async fn list_fragments(
        &self,
        request: &ClipRequest,
        from: SystemTime,
        to: SystemTime,
    ) -> Result<Vec<FragmentInfo>> {
        let stream = &request.stream;
        let range = TimestampRange::builder()
            .start_timestamp(DateTime::from(from))
            .end_timestamp(DateTime::from(to))
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("TimestampRange: {e}")))?;
        let selector = FragmentSelector::builder()
            .fragment_selector_type(request.selector.fragment_selector())
            .timestamp_range(range)
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("FragmentSelector: {e}")))?;
        let mut fragments = Vec::new();
        let mut token: Option<String> = None;
        let mut pages = 0;
        loop {
            pages += 1;
            let page_token = token.clone();
            let output = retry(&self.backoff, "ListFragments", |_| {
                let page_token = page_token.clone();
                let selector = selector.clone();
                async move {
                    let media = self
                        .client
                        .archived_media(stream, ApiName::ListFragments)
                        .await?;
                    let mut call = media
                        .list_fragments()
                        .max_results(i64::from(self.options.list_page_size));
                    call = match stream {
                        StreamId::Name(name) => call.stream_name(name),
                        StreamId::Arn(arn) => call.stream_arn(arn),
                    };
                    // The selector is only needed without a token (service model).
                    call = match page_token {
                        Some(t) => call.next_token(t),
                        None => call.fragment_selector(selector),
                    };
                    let result = call
                        .send()
                        .await
                        .map_err(|e| Error::from_sdk("ListFragments", e));
                    self.after_data_call(stream, ApiName::ListFragments, &result);
                    result
                }
            })
            .await?;
            for f in output.fragments() {
                fragments.push(FragmentInfo::from_sdk(f)?);
            }
            match output.next_token().filter(|t| !t.is_empty()) {
                None => break,
                Some(next) if token.as_deref() == Some(next) => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        "ListFragments returned the same NextToken twice",
                    ));
                }
                Some(next) => token = Some(next.to_owned()),
            }
            if pages >= MAX_PAGES {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("ListFragments did not end after {MAX_PAGES} pages"),
                ));
            }
        }
        Ok(fragments)
    }

    /// Forgets the data endpoint after a failure that may be the endpoint's (AWS: cached
    /// endpoints must be reloaded on failure). Throttling, "no fragments" and invalid arguments
    /// say nothing about the endpoint.
    fn after_data_call<T>(&self, stream: &StreamId, api: ApiName, result: &Result<T>) {
        if let Err(err) = result
            && matches!(
                err.kind(),
                ErrorKind::Network
                    | ErrorKind::Timeout
                    | ErrorKind::ServiceUnavailable
                    | ErrorKind::Protocol
                    | ErrorKind::StreamNotFound
                    | ErrorKind::NotAuthorized
            )
        {
            tracing::debug!(%stream, api = api.as_str(), error = %err, "data endpoint invalidated");
            self.client.invalidate_endpoint(stream, api);
        }
    }

    /// Steps 3–4: GetClip per chunk, each part appended to the muxer.
    async fn download_and_join(
        &self,
        request: &ClipRequest,
        plan: &[FragmentInfo],
        work: &WorkDir,
    ) -> Result<(ClipInfo, Option<Keyframe>)> {
        let selector = request.selector;
        let mut muxer: Option<Muxer> = None;
        let mut offset = gst::ClockTime::ZERO;
        let mut frames = 0u64;
        let mut calls = 0usize;
        let mut done = 0usize;
        while done < plan.len() {
            let remaining = &plan[done..];
            let len = chunk_len(
                remaining,
                selector,
                self.options.max_fragments_per_call,
                self.options.max_bytes_per_call,
            );
            let chunk = &remaining[..len];
            let part = work.path.join(format!("part-{calls:05}.mp4"));
            let bytes = self.get_clip(request, chunk, &part).await?;
            calls += 1;
            let out = work.clip_path();
            let faststart = work.path.join("faststart.tmp");
            let part_path = part.clone();
            let (joined, report) = tokio::task::spawn_blocking(move || {
                append_part(muxer, &part_path, offset, &out, &faststart)
            })
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("clip join task: {e}")))??;
            muxer = Some(joined);
            let _ = tokio::fs::remove_file(&part).await;
            let covered = covered_fragments(chunk, report.duration);
            tracing::debug!(
                stream = %request.stream,
                call = calls,
                asked = chunk.len(),
                covered,
                bytes,
                frames = report.frames,
                "GetClip part joined"
            );
            if covered == 0 {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "GetClip returned no usable media for fragment {} ({} bytes, {:?} of video)",
                        chunk[0].number,
                        bytes,
                        Duration::from(report.duration)
                    ),
                ));
            }
            let listed: Duration = chunk.iter().map(|f| f.duration).sum();
            let next_half = remaining
                .get(len)
                .map_or(Duration::ZERO, |f| f.duration / 2);
            if Duration::from(report.duration) > listed + next_half.max(Duration::from_millis(500))
            {
                tracing::warn!(
                    stream = %request.stream,
                    listed_ms = u64::try_from(listed.as_millis()).unwrap_or(u64::MAX),
                    got_ms = u64::try_from(Duration::from(report.duration).as_millis()).unwrap_or(u64::MAX),
                    "GetClip returned more video than the listed fragments last (overlapping \
                     timestamps?): the clip may repeat frames at this join"
                );
            }
            if covered < chunk.len() {
                tracing::warn!(
                    stream = %request.stream,
                    asked = chunk.len(),
                    covered,
                    next = %chunk[covered].number,
                    "GetClip returned fewer fragments than asked: continuing from the first missing one"
                );
            }
            offset += report.duration;
            frames += report.frames;
            done += covered;
        }
        let Some(muxer) = muxer else {
            return Err(Error::new(ErrorKind::Internal, "no clip part was joined"));
        };
        let keyframe = muxer.keyframe.clone();
        tokio::task::spawn_blocking(move || muxer.finish())
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("clip finish task: {e}")))??;
        let (first, last) = (&plan[0], &plan[plan.len() - 1]);
        let info = ClipInfo {
            stream: request.stream.clone(),
            path: None,
            thumbnail_path: None,
            thumbnail_error: None,
            size_bytes: 0,
            fragments: plan.len(),
            get_clip_calls: calls,
            frames,
            media_duration: Duration::from(offset),
            first_fragment_start: first.start(selector),
            last_fragment_end: last.start(selector) + last.duration,
            first_fragment_number: first.number.clone(),
            last_fragment_number: last.number.clone(),
        };
        Ok((info, keyframe))
    }

    /// One GetClip call over `[chunk[0] start, chunk[last] start]`, streamed into `path`.
    async fn get_clip(
        &self,
        request: &ClipRequest,
        chunk: &[FragmentInfo],
        path: &Path,
    ) -> Result<u64> {
        let stream = &request.stream;
        let start = chunk[0].start(request.selector);
        let last = chunk[chunk.len() - 1].start(request.selector);
        // KVS wants End > Start; a single fragment gets one more millisecond.
        let end = if last > start {
            last
        } else {
            start + Duration::from_millis(1)
        };
        let range = aws_sdk_kinesisvideoarchivedmedia::types::ClipTimestampRange::builder()
            .start_timestamp(DateTime::from(start))
            .end_timestamp(DateTime::from(end))
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("ClipTimestampRange: {e}")))?;
        let selector = ClipFragmentSelector::builder()
            .fragment_selector_type(request.selector.clip_selector())
            .timestamp_range(range)
            .build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("ClipFragmentSelector: {e}")))?;
        retry(&self.backoff, "GetClip", |_| {
            let selector = selector.clone();
            async move {
                let media = self.client.archived_media(stream, ApiName::GetClip).await?;
                let result = async {
                    let call = media.get_clip().clip_fragment_selector(selector);
                    let call = match stream {
                        StreamId::Name(name) => call.stream_name(name),
                        StreamId::Arn(arn) => call.stream_arn(arn),
                    };
                    let mut output = call
                        .send()
                        .await
                        .map_err(|e| Error::from_sdk("GetClip", e))?;
                    if let Some(kind) = output.content_type()
                        && kind != "video/mp4"
                    {
                        tracing::warn!(%stream, content_type = kind, "GetClip: unexpected Content-Type");
                    }
                    let mut file = tokio::fs::File::create(path).await?;
                    let mut written = 0u64;
                    while let Some(piece) = output.payload.next().await {
                        let piece = piece.map_err(|e| {
                            Error::new(
                                ErrorKind::Network,
                                format!("GetClip body cut short after {written} bytes: {e}"),
                            )
                        })?;
                        file.write_all(&piece).await?;
                        written += piece.len() as u64;
                    }
                    file.flush().await?;
                    Ok(written)
                }
                .await;
                self.after_data_call(stream, ApiName::GetClip, &result);
                result
            }
        })
        .await
    }
}

/// Sorts by the selected timestamp (then fragment number), removes duplicates (the same number,
/// or the same timestamp: KVS keeps the oldest ingested), and keeps the fragment that contains
/// `start` (if asked) plus every fragment starting in `[start, end]`.
fn select_fragments(
    mut all: Vec<FragmentInfo>,
    start: SystemTime,
    end: SystemTime,
    selector: TimestampSelector,
    include_at_start: bool,
) -> Vec<FragmentInfo> {
    all.sort_by(|a, b| {
        a.start(selector)
            .cmp(&b.start(selector))
            .then_with(|| a.number_key().cmp(&b.number_key()))
    });
    all.dedup_by(|later, earlier| {
        later.number == earlier.number || later.start(selector) == earlier.start(selector)
    });
    let first_in_range = all.partition_point(|f| f.start(selector) < start);
    let begin = match first_in_range.checked_sub(1) {
        Some(before)
            if include_at_start && all[before].start(selector) + all[before].duration > start =>
        {
            before
        }
        _ => first_in_range,
    };
    let stop = all.partition_point(|f| f.start(selector) <= end);
    if begin >= stop {
        return Vec::new();
    }
    all.truncate(stop);
    all.drain(..begin);
    all
}

/// How many fragments of `fragments` (at least one) fit into one GetClip call.
fn chunk_len(
    fragments: &[FragmentInfo],
    selector: TimestampSelector,
    max_fragments: usize,
    max_bytes: u64,
) -> usize {
    let Some(first) = fragments.first() else {
        return 0;
    };
    let origin = first.start(selector);
    let mut bytes = 0u64;
    let mut n = 0;
    for f in fragments {
        let span = f.start(selector).duration_since(origin).unwrap_or_default();
        if n > 0
            && (n >= max_fragments
                || bytes.saturating_add(f.size_bytes) > max_bytes
                || span > GET_CLIP_MAX_RANGE)
        {
            break;
        }
        bytes = bytes.saturating_add(f.size_bytes);
        n += 1;
    }
    n.max(1)
}

/// How many leading fragments of `chunk` a part with `duration` of video holds: fragment `i`
/// counts when the video reaches past its middle (robust to millisecond rounding of
/// `FragmentLengthInMilliseconds`).
fn covered_fragments(chunk: &[FragmentInfo], duration: gst::ClockTime) -> usize {
    let duration = Duration::from(duration);
    let mut start = Duration::ZERO;
    let mut covered = 0;
    for f in chunk {
        if duration < start + f.duration / 2 {
            break;
        }
        covered += 1;
        start += f.duration;
    }
    covered
}

/// A KVS timestamp, rounded to the millisecond: KVS's precision, which the SDK's parsing of
/// epoch seconds as a float does not keep exactly (`.053` may arrive as `.052999…`).
fn to_millis(t: &DateTime) -> Option<SystemTime> {
    let secs = u64::try_from(t.secs()).ok()?;
    let millis = secs.checked_mul(1000)?.checked_add(u64::from(
        t.subsec_nanos().saturating_add(500_000) / 1_000_000,
    ))?;
    UNIX_EPOCH.checked_add(Duration::from_millis(millis))
}

fn format_time(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

// ---------------------------------------------------------------------------------------------
// Work directory: removed when dropped, whatever happened.

struct WorkDir {
    path: PathBuf,
}

impl WorkDir {
    async fn create(parent: &Path, name: &str) -> Result<WorkDir> {
        let path = parent.join(format!(
            ".{name}.{:016x}{WORK_DIR_SUFFIX}",
            rand::random::<u64>()
        ));
        tokio::fs::create_dir(&path).await.map_err(|e| {
            Error::from(e).context(format!("creating work directory {}", path.display()))
        })?;
        Ok(WorkDir { path })
    }

    fn clip_path(&self) -> PathBuf {
        self.path.join("clip.mp4")
    }
}

impl Drop for WorkDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "cannot remove a clip work directory");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// GStreamer: demux each part, re-time its samples, append them to one mp4mux; the thumbnail.

/// The first key frame of a clip and its caps, for the thumbnail.
#[derive(Clone)]
struct Keyframe {
    caps: gst::Caps,
    buffer: gst::Buffer,
}

/// `appsrc ! mp4mux faststart=true ! filesink`, fed with the parts' samples.
struct Muxer {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    caps: gst::Caps,
    keyframe: Option<Keyframe>,
}

/// What joining parts and thumbnails create (checked by [`ClipExtractor::new`]).
const CLIP_ELEMENTS: &[&str] = &[
    "appsrc",
    "appsink",
    "filesrc",
    "filesink",
    "qtdemux",
    "mp4mux",
    "h264parse",
    "avdec_h264",
    "h265parse",
    "avdec_h265",
    "videoconvert",
    "jpegenc",
];

impl Muxer {
    fn new(caps: &gst::Caps, out: &Path, faststart: &Path) -> Result<Muxer> {
        let pipeline = gst::Pipeline::with_name("kvs-clip-mux");
        let src = gst_app::AppSrc::builder()
            .caps(caps)
            .format(gst::Format::Time)
            .is_live(false)
            .block(true)
            .max_bytes(2 * 1024 * 1024)
            .build();
        let mux = make_with("mp4mux", |b| {
            b.property("faststart", true)
                .property("faststart-file", faststart.to_string_lossy().into_owned())
        })?;
        let sink = make_with("filesink", |b| {
            b.property("location", out.to_string_lossy().into_owned())
                .property("sync", false)
        })?;
        pipeline.add_many([src.upcast_ref(), &mux, &sink])?;
        // Explicitly the video request pad (a plain link may pick `audio_%u`).
        let video = mux
            .request_pad_simple("video_%u")
            .ok_or_else(|| Error::new(ErrorKind::Pipeline, "mp4mux has no video pad"))?;
        let src_pad = src
            .static_pad("src")
            .ok_or_else(|| Error::new(ErrorKind::Internal, "appsrc without a src pad"))?;
        src_pad.link(&video).map_err(|e| {
            Error::new(ErrorKind::Pipeline, format!("cannot link to mp4mux: {e:?}"))
        })?;
        mux.link(&sink)?;
        let muxer = Muxer {
            pipeline,
            src,
            caps: caps.clone(),
            keyframe: None,
        };
        if let Err(e) = muxer.pipeline.set_state(gst::State::Playing) {
            return Err(bus_error(&muxer.pipeline).unwrap_or_else(|| Error::from(e)));
        }
        Ok(muxer)
    }

    fn push(&self, buffer: gst::Buffer) -> Result<()> {
        self.src.push_buffer(buffer).map(|_| ()).map_err(|flow| {
            bus_error(&self.pipeline).unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Pipeline,
                    format!("the MP4 muxer refused a sample ({flow:?})"),
                )
            })
        })
    }

    /// EOS, then waits until the file is complete.
    fn finish(self) -> Result<()> {
        self.src.end_of_stream().map_err(|flow| {
            Error::new(
                ErrorKind::Pipeline,
                format!("the MP4 muxer refused the end of stream ({flow:?})"),
            )
        })?;
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "pipeline without a bus"))?;
        let msg = bus.timed_pop_filtered(
            GST_TIMEOUT,
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        match msg.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(err)) => Err(gst_error(err)),
            _ => Err(Error::new(
                ErrorKind::Timeout,
                "the MP4 muxer did not finish the file in time",
            )),
        }
    }

    fn compatible(&self, caps: &gst::Caps) -> bool {
        let (Some(a), Some(b)) = (self.caps.structure(0), caps.structure(0)) else {
            return false;
        };
        a.name() == b.name()
            && ["codec_data", "width", "height", "stream-format"]
                .iter()
                .all(|&field| {
                    a.value(field).ok().map(|v| v.serialize().ok())
                        == b.value(field).ok().map(|v| v.serialize().ok())
                })
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// What one part contributed.
struct PartReport {
    frames: u64,
    /// Presentation span of its samples.
    duration: gst::ClockTime,
}

/// Demuxes `part` and appends its video samples to `muxer` (created from the part's caps if
/// `None`), shifted to start at `offset`.
fn append_part(
    muxer: Option<Muxer>,
    part: &Path,
    offset: gst::ClockTime,
    out: &Path,
    faststart: &Path,
) -> Result<(Muxer, PartReport)> {
    let pipeline = gst::Pipeline::with_name("kvs-clip-demux");
    let src = make_with("filesrc", |b| {
        b.property("location", part.to_string_lossy().into_owned())
    })?;
    let demux = make("qtdemux")?;
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .max_buffers(64)
        .drop(false)
        .build();
    pipeline.add_many([&src, &demux, sink.upcast_ref()])?;
    src.link(&demux)?;
    let sink_pad = sink
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Internal, "appsink without a sink pad"))?;
    demux.connect_pad_added(move |_, pad| {
        let is_video = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        if is_video && !sink_pad.is_linked() {
            let _ = pad.link(&sink_pad);
        }
    });
    let _stop = StopOnDrop(pipeline.clone());
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return Err(bus_error(&pipeline).unwrap_or_else(|| Error::from(e)));
    }
    let mut muxer = muxer;
    let mut origin: Option<gst::ClockTime> = None;
    let mut min_pts: Option<gst::ClockTime> = None;
    let mut max_end: Option<gst::ClockTime> = None;
    let mut frames = 0u64;
    loop {
        let Some(sample) = sink.try_pull_sample(GST_TIMEOUT) else {
            if sink.is_eos() {
                break;
            }
            return Err(bus_error(&pipeline).unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("demuxing {} produced nothing in time", part.display()),
                )
            }));
        };
        let caps = sample
            .caps()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "a clip sample without caps"))?
            .to_owned();
        let Some(buffer) = sample.buffer_owned() else {
            continue;
        };
        let current = match muxer.take() {
            Some(m) => {
                if frames == 0 && !m.compatible(&caps) {
                    return Err(Error::new(
                        ErrorKind::UnsupportedMedia,
                        format!(
                            "the codec configuration changes inside the clip range (from {} to {}): \
                             one MP4 holds one configuration; request the parts separately",
                            m.caps, caps
                        ),
                    ));
                }
                m
            }
            None => Muxer::new(&caps, out, faststart)?,
        };
        let muxer_ref = muxer.insert(current);
        let pts = buffer.pts().or(buffer.dts());
        let dts = buffer.dts();
        let first = *origin.get_or_insert(dts.or(pts).unwrap_or(gst::ClockTime::ZERO));
        if let Some(pts) = pts {
            min_pts = Some(min_pts.map_or(pts, |m| m.min(pts)));
            let end = pts + buffer.duration().unwrap_or(gst::ClockTime::ZERO);
            max_end = Some(max_end.map_or(end, |m| m.max(end)));
        }
        if muxer_ref.keyframe.is_none() && !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            muxer_ref.keyframe = Some(Keyframe {
                caps: caps.clone(),
                buffer: buffer.clone(),
            });
        }
        let shift = |t: Option<gst::ClockTime>| {
            t.map(|t| t.checked_sub(first).unwrap_or(gst::ClockTime::ZERO) + offset)
        };
        let mut out_buffer = buffer.copy();
        {
            let b = out_buffer.make_mut();
            b.set_pts(shift(pts));
            b.set_dts(shift(dts));
        }
        muxer_ref.push(out_buffer)?;
        frames += 1;
    }
    if let Some(err) = bus_error(&pipeline) {
        return Err(err.context(format!("demuxing {}", part.display())));
    }
    let Some(muxer) = muxer else {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("GetClip returned no video samples ({})", part.display()),
        ));
    };
    let duration = match (min_pts, max_end) {
        (Some(min), Some(max)) => max.checked_sub(min).unwrap_or(gst::ClockTime::ZERO),
        _ => gst::ClockTime::ZERO,
    };
    Ok((muxer, PartReport { frames, duration }))
}

/// Sets a pipeline to NULL when dropped.
struct StopOnDrop(gst::Pipeline);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

fn gst_error(err: &gst::message::Error) -> Error {
    let e = Error::from(err.error());
    match err.src() {
        Some(src) => e.context(format!("GStreamer element {}", src.path_string())),
        None => e,
    }
}

/// The first error message on the pipeline's bus, if any.
fn bus_error(pipeline: &gst::Pipeline) -> Option<Error> {
    let bus = pipeline.bus()?;
    let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
    match msg.view() {
        gst::MessageView::Error(err) => Some(gst_error(err)),
        _ => None,
    }
}

/// The JPEG of the clip's first frame.
async fn thumbnail(keyframe: Option<Keyframe>) -> Result<Vec<u8>> {
    let keyframe = keyframe.ok_or_else(|| {
        Error::new(
            ErrorKind::Decode,
            "the clip has no key frame to make a thumbnail from",
        )
    })?;
    tokio::task::spawn_blocking(move || encode_jpeg(&keyframe))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("thumbnail task: {e}")))?
}

/// `appsrc ! h264parse ! avdec_h264 ! videoconvert ! jpegenc ! appsink` (h265parse/avdec_h265
/// for H.265) over one key frame.
fn encode_jpeg(keyframe: &Keyframe) -> Result<Vec<u8>> {
    let name = keyframe
        .caps
        .structure(0)
        .map(|s| s.name().to_string())
        .unwrap_or_default();
    let (parser, decoder) = match name.as_str() {
        "video/x-h264" => ("h264parse", "avdec_h264"),
        "video/x-h265" => ("h265parse", "avdec_h265"),
        other => {
            return Err(Error::new(
                ErrorKind::UnsupportedMedia,
                format!("no thumbnail decoder for {other}"),
            ));
        }
    };
    let pipeline = gst::Pipeline::with_name("kvs-clip-thumbnail");
    let src = gst_app::AppSrc::builder()
        .caps(&keyframe.caps)
        .format(gst::Format::Time)
        .build();
    let parse = make(parser)?;
    let decode = make(decoder)?;
    let convert = make("videoconvert")?;
    let jpeg = make("jpegenc")?;
    let sink = gst_app::AppSink::builder().sync(false).build();
    pipeline.add_many([
        src.upcast_ref(),
        &parse,
        &decode,
        &convert,
        &jpeg,
        sink.upcast_ref(),
    ])?;
    gst::Element::link_many([
        src.upcast_ref(),
        &parse,
        &decode,
        &convert,
        &jpeg,
        sink.upcast_ref(),
    ])?;
    let _stop = StopOnDrop(pipeline.clone());
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return Err(bus_error(&pipeline).unwrap_or_else(|| Error::from(e)));
    }
    let mut buffer = keyframe.buffer.copy();
    {
        let b = buffer.make_mut();
        b.set_pts(gst::ClockTime::ZERO);
        b.set_dts(gst::ClockTime::ZERO);
    }
    let pushed = src.push_buffer(buffer).and_then(|_| src.end_of_stream());
    if let Err(flow) = pushed {
        return Err(bus_error(&pipeline).unwrap_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("thumbnail decoder refused the frame ({flow:?})"),
            )
        }));
    }
    let sample = sink.try_pull_sample(GST_TIMEOUT).ok_or_else(|| {
        bus_error(&pipeline).unwrap_or_else(|| {
            Error::new(ErrorKind::Decode, "the thumbnail decoder produced no frame")
        })
    })?;
    let buffer = sample
        .buffer()
        .ok_or_else(|| Error::new(ErrorKind::Decode, "empty thumbnail sample"))?;
    let map = buffer
        .map_readable()
        .map_err(|e| Error::new(ErrorKind::Decode, format!("thumbnail buffer: {e}")))?;
    Ok(map.as_slice().to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: u64 = 1_700_000_000_000;

    fn frag(n: u64, start_ms: u64, len_ms: u64, size: u64) -> FragmentInfo {
        FragmentInfo {
            number: format!("91343852333{n:010}"),
            producer_timestamp: UNIX_EPOCH + Duration::from_millis(T0 + start_ms),
            server_timestamp: UNIX_EPOCH + Duration::from_millis(T0 + start_ms + 300),
            duration: Duration::from_millis(len_ms),
            size_bytes: size,
        }
    }

    fn at(ms: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_millis(T0 + ms)
    }

    fn numbers(v: &[FragmentInfo]) -> Vec<u64> {
        v.iter().map(|f| f.number[11..].parse().unwrap()).collect()
    }

    #[test]
    fn selection_sorts_dedups_and_includes_the_fragment_containing_start() {
        // Ten 1 s fragments, listed out of order, one twice.
        let mut listed: Vec<_> = (0..10).map(|i| frag(i, i * 1000, 1000, 10)).collect();
        listed.reverse();
        listed.push(frag(4, 4000, 1000, 10));
        let p = TimestampSelector::Producer;
        // Start inside fragment 2: 2..=5 (5 starts at 5000 ≤ end).
        let got = select_fragments(listed.clone(), at(2500), at(5000), p, true);
        assert_eq!(numbers(&got), [2, 3, 4, 5]);
        // Without the containing fragment.
        let got = select_fragments(listed.clone(), at(2500), at(5000), p, false);
        assert_eq!(numbers(&got), [3, 4, 5]);
        // Start exactly on a fragment: no earlier one.
        let got = select_fragments(listed.clone(), at(3000), at(3999), p, true);
        assert_eq!(numbers(&got), [3]);
        // Server timestamps are 300 ms later.
        let got = select_fragments(
            listed.clone(),
            at(3000),
            at(3999),
            TimestampSelector::Server,
            true,
        );
        assert_eq!(numbers(&got), [2, 3]);
        // A start in a gap does not pull in the fragment before the gap.
        let gap = vec![frag(0, 0, 1000, 1), frag(1, 5000, 1000, 1)];
        assert_eq!(
            numbers(&select_fragments(gap.clone(), at(2000), at(9000), p, true)),
            [1]
        );
        assert!(select_fragments(gap, at(2000), at(4000), p, true).is_empty());
        assert!(select_fragments(listed, at(20_000), at(30_000), p, true).is_empty());
    }

    #[test]
    fn kvs_timestamps_are_rounded_to_the_millisecond() {
        let parsed = DateTime::from_fractional_secs(1_795_257_107, 0.052_999_9);
        assert_eq!(
            to_millis(&parsed),
            Some(UNIX_EPOCH + Duration::from_millis(1_795_257_107_053))
        );
        let parsed = DateTime::from_secs_and_nanos(1_795_257_046, 969_000_101);
        assert_eq!(
            to_millis(&parsed),
            Some(UNIX_EPOCH + Duration::from_millis(1_795_257_046_969))
        );
        assert_eq!(to_millis(&DateTime::from_secs(-5)), None);
    }

    #[test]
    fn duplicate_producer_timestamps_keep_the_oldest_fragment() {
        let a = frag(7, 1000, 1000, 1);
        let mut b = frag(9, 1000, 1000, 1);
        b.server_timestamp = at(50_000);
        let got = select_fragments(
            vec![b, a],
            at(0),
            at(5000),
            TimestampSelector::Producer,
            true,
        );
        assert_eq!(numbers(&got), [7]);
    }

    #[test]
    fn chunks_respect_fragment_byte_and_range_limits() {
        let p = TimestampSelector::Producer;
        let frags: Vec<_> = (0..450).map(|i| frag(i, i * 100, 100, 1000)).collect();
        assert_eq!(chunk_len(&frags, p, 200, u64::MAX), 200);
        assert_eq!(chunk_len(&frags[400..], p, 200, u64::MAX), 50);
        assert_eq!(chunk_len(&frags, p, 200, 5500), 5);
        assert_eq!(
            chunk_len(&frags, p, 200, 10),
            1,
            "one oversized fragment still goes"
        );
        assert_eq!(chunk_len(&[], p, 200, 10), 0);
        let sparse = vec![frag(0, 0, 1000, 1), frag(1, 90_000_000, 1000, 1)];
        assert_eq!(
            chunk_len(&sparse, p, 200, u64::MAX),
            1,
            "a call spans at most 24 h"
        );
    }

    #[test]
    fn covered_fragments_counts_whole_fragments_of_a_part() {
        let chunk: Vec<_> = (0..5).map(|i| frag(i, i * 1000, 1000, 1)).collect();
        let secs = |ms: u64| gst::ClockTime::from_mseconds(ms);
        assert_eq!(covered_fragments(&chunk, secs(5000)), 5);
        assert_eq!(covered_fragments(&chunk, secs(4990)), 5, "rounding");
        assert_eq!(covered_fragments(&chunk, secs(3000)), 3, "cut short");
        assert_eq!(covered_fragments(&chunk, secs(100)), 0);
    }

    #[test]
    fn requests_and_options_are_validated() {
        let now = SystemTime::now();
        let err = ClipRequest::new("cam-1", now, now).validate().unwrap_err();
        assert_eq!(err.invalid_option(), Some("ClipRequest::end"));
        let err = ClipRequest::new("bad name", now, now + Duration::from_secs(1))
            .validate()
            .unwrap_err();
        assert_eq!(err.invalid_option(), Some("stream_name"));
        assert!(ClipOptions::default().validate().is_ok());
        for (options, name) in [
            (
                ClipOptions::default().max_fragments_per_call(201),
                "ClipOptions::max_fragments_per_call",
            ),
            (
                ClipOptions::default().max_bytes_per_call(0),
                "ClipOptions::max_bytes_per_call",
            ),
            (
                ClipOptions::default().max_fragment_duration(Duration::ZERO),
                "ClipOptions::max_fragment_duration",
            ),
            (
                ClipOptions::default().list_page_size(1001),
                "ClipOptions::list_page_size",
            ),
            (
                ClipOptions::default().max_attempts(0),
                "ClipOptions::max_attempts",
            ),
        ] {
            assert_eq!(options.validate().unwrap_err().invalid_option(), Some(name));
        }
    }
}
