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
//! # GetClip alone
//!
//! Where `ListFragments` is refused (IAM) or unknown to the endpoint, [`ClipPlanning::Auto`]
//! (the default) makes clips with GetClip alone, by time, remembered per [`KvsClient`]: steps
//! 2–3 are replaced by GetClip over the range, continued where a response may have been cut
//! short, with repeated samples skipped at the joins (see `by_time` and docs/clips.md).
//!
//! Memory stays bounded whatever the clip size: bodies are streamed to disk and GStreamer's
//! queues are bounded. Disk needs about twice the clip size while it is written (the part being
//! joined, the clip, and `mp4mux`'s `faststart` temporary file that puts the index first).
//!
//! The video track is kept, and an audio track (KVS track 2) when the clip's first part has
//! one: moved with the video at every join, so it stays in sync. All fragments of a clip must
//! share one codec configuration
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
//!
//! The code: `request` (what to extract and how: [`ClipRequest`], [`ClipOptions`],
//! [`TimestampSelector`]), `plan` (steps 1–3: [`FragmentInfo`], ListFragments, the selection and
//! the chunks), `fetch` (steps 3–4: the GetClip calls and the loop that joins their parts),
//! `by_time` (GetClip alone), `join` (the GStreamer demuxer and muxer, the sample keys that
//! find repeats), `thumbnail` (the JPEG of the first frame); this
//! file holds [`ClipExtractor`], its results and step 5 (the work directory and the rename).

mod by_time;
mod fetch;
mod join;
mod plan;
mod request;
mod thumbnail;

use std::fmt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_sdk_kinesisvideo::types::ApiName;
use gstreamer as gst;

use super::client::{KvsClient, StreamId};
use super::discovery::Backoff;
use crate::error::{Error, ErrorKind, Result};

pub use plan::FragmentInfo;
pub use request::{ClipOptions, ClipPlanning, ClipRequest, TimestampSelector};

use thumbnail::thumbnail;

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
    /// KVS fragments in the clip ([`ClipPlanning::GetClipOnly`]: its key frames, one per
    /// fragment as KVS producers fragment).
    pub fragments: usize,
    /// `GetClip` calls made.
    pub get_clip_calls: usize,
    /// Video frames (samples) in the clip.
    pub frames: u64,
    /// Duration of the clip's video.
    pub media_duration: Duration,
    /// Start (for the request's selector) of the first fragment: the clip's first frame.
    /// [`ClipPlanning::GetClipOnly`] knows no fragment times: the start of the first GetClip
    /// range that returned media, which the fragment starts at or after.
    pub first_fragment_start: SystemTime,
    /// Start of the last fragment plus its duration ([`ClipPlanning::GetClipOnly`]:
    /// `first_fragment_start` + `media_duration`).
    pub last_fragment_end: SystemTime,
    /// `FragmentNumber` of the first fragment (empty with [`ClipPlanning::GetClipOnly`]).
    pub first_fragment_number: String,
    /// `FragmentNumber` of the last fragment (empty with [`ClipPlanning::GetClipOnly`]).
    pub last_fragment_number: String,
    /// How the fragments were found: [`ClipPlanning::ListFragments`] or
    /// [`ClipPlanning::GetClipOnly`] (never `Auto`).
    pub planning: ClipPlanning,
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
        let plan = self.plan_clip(request).await?;
        tokio::fs::create_dir_all(&parent).await.map_err(|e| {
            Error::from(e).context(format!("creating directory {}", parent.display()))
        })?;
        let work = WorkDir::create(&parent, file_name).await?;
        let (mut info, keyframe) = self.download(request, plan, &work).await?;
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
        let plan = self.plan_clip(request).await?;
        let parent = self
            .options
            .work_dir
            .clone()
            .unwrap_or_else(std::env::temp_dir);
        tokio::fs::create_dir_all(&parent).await?;
        let work = WorkDir::create(&parent, "clip").await?;
        let (mut info, keyframe) = self.download(request, plan, &work).await?;
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

    /// Steps 3–4 for a plan.
    async fn download(
        &self,
        request: &ClipRequest,
        plan: plan::Plan,
        work: &WorkDir,
    ) -> Result<(ClipInfo, Option<join::Keyframe>)> {
        match plan {
            plan::Plan::Listed(fragments) => {
                self.download_and_join(request, &fragments, work).await
            }
            plan::Plan::ByTime => self.download_by_time(request, work).await,
        }
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
