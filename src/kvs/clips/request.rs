//! What to extract and how: [`ClipRequest`] (a stream, a time range, the timestamp
//! [`TimestampSelector`], a thumbnail or not) and [`ClipOptions`] (the per-call limits, paging,
//! retries), with their validation.

use std::path::PathBuf;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesisvideoarchivedmedia::types::{ClipFragmentSelectorType, FragmentSelectorType};

use super::{
    GET_CLIP_MAX_BYTES, GET_CLIP_MAX_FRAGMENTS, LIST_FRAGMENTS_MAX_RESULTS, MAX_FRAGMENT_DURATION,
    format_time,
};
use crate::error::{Error, Result};
use crate::kvs::client::StreamId;
use crate::kvs::discovery::Backoff;

/// How a clip's fragments are found ([`ClipOptions::planning`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub enum ClipPlanning {
    /// `ListFragments` first; when it is refused (`AccessDeniedException` or
    /// `NotAuthorizedException`: the IAM policy does not allow it) or unknown to the endpoint
    /// (`UnknownOperationException`), GetClip alone, remembered per [`KvsClient`] so that it is
    /// not asked again. The default.
    ///
    /// [`KvsClient`]: crate::kvs::KvsClient
    #[default]
    Auto,
    /// Always `ListFragments` + `GetClip` (a refusal is an error).
    ListFragments,
    /// Always GetClip alone, by time: for policies that grant `GetClip` but not
    /// `ListFragments` (see the [module docs](super#getclip-alone)).
    GetClipOnly,
}

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

    pub(super) fn fragment_selector(self) -> FragmentSelectorType {
        match self {
            TimestampSelector::Producer => FragmentSelectorType::ProducerTimestamp,
            TimestampSelector::Server => FragmentSelectorType::ServerTimestamp,
        }
    }

    pub(super) fn clip_selector(self) -> ClipFragmentSelectorType {
        match self {
            TimestampSelector::Producer => ClipFragmentSelectorType::ProducerTimestamp,
            TimestampSelector::Server => ClipFragmentSelectorType::ServerTimestamp,
        }
    }
}

/// What to extract: a stream and a time range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClipRequest {
    pub(super) stream: StreamId,
    pub(super) start: SystemTime,
    pub(super) end: SystemTime,
    pub(super) selector: TimestampSelector,
    pub(super) include_fragment_at_start: bool,
    pub(super) thumbnail: bool,
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
    ///
    /// [`ClipExtractor::extract_to_file`]: super::ClipExtractor::extract_to_file
    /// [`ClipBytes::thumbnail_jpeg`]: super::ClipBytes::thumbnail_jpeg
    /// [`ClipExtractor::extract_to_bytes`]: super::ClipExtractor::extract_to_bytes
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

    pub(super) fn validate(&self) -> Result<()> {
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
///
/// [`ClipExtractor`]: super::ClipExtractor
/// [`ClipExtractor::new`]: super::ClipExtractor::new
#[derive(Clone, Debug)]
pub struct ClipOptions {
    pub(super) max_fragments_per_call: usize,
    pub(super) max_bytes_per_call: u64,
    pub(super) max_fragment_duration: Duration,
    pub(super) list_page_size: u32,
    pub(super) check_stream_status: bool,
    pub(super) work_dir: Option<PathBuf>,
    pub(super) max_attempts: u32,
    pub(super) initial_backoff: Duration,
    pub(super) max_backoff: Duration,
    pub(super) planning: ClipPlanning,
}

impl Default for ClipOptions {
    /// `ListFragments` when allowed (else GetClip alone), 200 fragments and 10^8 bytes per GetClip call, 20 s look-back for the fragment that
    /// contains the start, ListFragments pages of 1000, stream status checked, work files of
    /// [`extract_to_bytes`] in the system temporary directory, 5 attempts per call with backoff
    /// from 200 ms to 5 s.
    ///
    /// [`extract_to_bytes`]: super::ClipExtractor::extract_to_bytes
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
            planning: ClipPlanning::Auto,
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
    /// true). Turn it off when the stream comes from [`Discovery`](crate::kvs::Discovery), which
    /// only returns ACTIVE streams, to save one call per clip.
    #[must_use]
    pub fn check_stream_status(mut self, check: bool) -> Self {
        self.check_stream_status = check;
        self
    }

    /// Directory for the work files of [`extract_to_bytes`] (default: the system temporary
    /// directory). `extract_to_file` always works next to its destination, so that the final
    /// rename is atomic.
    ///
    /// [`extract_to_bytes`]: super::ClipExtractor::extract_to_bytes
    #[must_use]
    pub fn work_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.work_dir = Some(dir.into());
        self
    }

    /// How the clip's fragments are found (default [`ClipPlanning::Auto`]: `ListFragments`,
    /// or GetClip alone where `ListFragments` is refused).
    #[must_use]
    pub fn planning(mut self, planning: ClipPlanning) -> Self {
        self.planning = planning;
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

    pub(super) fn validate(&self) -> Result<Backoff> {
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

#[cfg(test)]
mod tests {
    use super::*;

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
