//! Steps 3–4 of a clip: one `GetClip` call per chunk of the plan, each response streamed to a
//! part file and appended to the muxer; a part that holds fewer fragments than asked makes the
//! next call start at the first missing one.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types::ClipFragmentSelector;
use aws_smithy_types::DateTime;
use gstreamer as gst;
use tokio::io::AsyncWriteExt;

use super::join::{Keyframe, Muxer, PartReport, append_part};
use super::plan::{chunk_len, covered_fragments};
use super::{ClipExtractor, ClipInfo, ClipPlanning, ClipRequest, FragmentInfo, WorkDir};
use crate::error::{Error, ErrorKind, Result};
use crate::kvs::client::StreamId;
use crate::kvs::discovery::retry;

/// The clip being joined: the muxer, where the next part goes on its timeline, and counts.
pub(super) struct Joiner<'a> {
    work: &'a WorkDir,
    muxer: Option<Muxer>,
    /// Media time joined so far.
    pub(super) offset: gst::ClockTime,
    pub(super) frames: u64,
    pub(super) keyframes: u64,
    /// GetClip calls made (those that returned no fragments too).
    pub(super) calls: usize,
}

impl<'a> Joiner<'a> {
    pub(super) fn new(work: &'a WorkDir) -> Self {
        Joiner {
            work,
            muxer: None,
            offset: gst::ClockTime::ZERO,
            frames: 0,
            keyframes: 0,
            calls: 0,
        }
    }

    /// Where the next GetClip response goes.
    pub(super) fn part_path(&self) -> PathBuf {
        self.work.path.join(format!("part-{:05}.mp4", self.calls))
    }

    /// Appends the samples of `part` after its first `skip` to the clip, then removes the file.
    pub(super) async fn append(&mut self, part: &Path, skip: usize) -> Result<PartReport> {
        let out = self.work.clip_path();
        let faststart = self.work.path.join("faststart.tmp");
        let part_path = part.to_path_buf();
        let muxer = self.muxer.take();
        let offset = self.offset;
        let (joined, report) = tokio::task::spawn_blocking(move || {
            append_part(muxer, &part_path, offset, skip, &out, &faststart)
        })
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("clip join task: {e}")))??;
        self.muxer = joined;
        let _ = tokio::fs::remove_file(part).await;
        self.offset += report.duration;
        self.frames += report.frames;
        self.keyframes += report.keyframes;
        Ok(report)
    }

    /// Finishes the file: its first key frame (for the thumbnail).
    pub(super) async fn finish(self) -> Result<Option<Keyframe>> {
        let Some(muxer) = self.muxer else {
            return Err(Error::new(ErrorKind::Internal, "no clip part was joined"));
        };
        let keyframe = muxer.keyframe.clone();
        tokio::task::spawn_blocking(move || muxer.finish())
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("clip finish task: {e}")))??;
        Ok(keyframe)
    }
}

impl ClipExtractor {
    /// Steps 3–4: GetClip per chunk, each part appended to the muxer.
    pub(super) async fn download_and_join(
        &self,
        request: &ClipRequest,
        plan: &[FragmentInfo],
        work: &WorkDir,
    ) -> Result<(ClipInfo, Option<Keyframe>)> {
        let selector = request.selector;
        let mut join = Joiner::new(work);
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
            let part = join.part_path();
            let bytes = self.get_clip(request, chunk, &part).await?;
            join.calls += 1;
            let report = join.append(&part, 0).await?;
            let covered = covered_fragments(chunk, report.duration);
            tracing::debug!(
                stream = %request.stream,
                call = join.calls,
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
            done += covered;
        }
        let (frames, calls, offset) = (join.frames, join.calls, join.offset);
        let keyframe = join.finish().await?;
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
            planning: ClipPlanning::ListFragments,
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
        let start = chunk[0].start(request.selector);
        let last = chunk[chunk.len() - 1].start(request.selector);
        self.get_clip_range(request, start, last, path).await
    }

    /// One GetClip call over `[start, last]` (the fragments that start in it), streamed into
    /// `path`; its size.
    pub(super) async fn get_clip_range(
        &self,
        request: &ClipRequest,
        start: SystemTime,
        last: SystemTime,
        path: &Path,
    ) -> Result<u64> {
        let stream = &request.stream;
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
