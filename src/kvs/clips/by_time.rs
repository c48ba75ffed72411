//! Clips with GetClip alone, for callers that may not call `ListFragments` (an IAM policy with
//! exactly ListStreams, DescribeStream, GetDataEndpoint and GetClip; endpoints without it).
//!
//! Without a fragment list nothing is known of fragment times, so the range is read by time:
//!
//! - **The fragment that contains `start`** (with [`ClipRequest::include_fragment_at_start`]):
//!   GetClip over `[start − max_fragment_duration, start)` returns the fragments that start
//!   before `start`; the last one's length is its last key frame to the end of the part (KVS
//!   producers start a fragment at every key frame). A second call over
//!   `[start − length + 1 ms, start)` returns it only if it starts late enough to still run at
//!   `start`: `start − length < its start`, the rule of the listed path. That call's media is
//!   the clip's head.
//! - **The range**, in windows of at most 24 h: GetClip over `[cursor, window end]`. A response
//!   with fewer than `max_fragments_per_call` key frames and under half of
//!   `max_bytes_per_call` holds every fragment that starts in the window, and the next window
//!   starts 1 ms after it. A larger one may have been cut short (KVS returns the first 200
//!   fragments or 100 MB): every fragment not yet in the clip starts at or after
//!   `cursor + the part's span` (its first fragment starts at or after `cursor`, and fragments do
//!   not overlap), so the next call starts there. Whatever that next response repeats of the
//!   previous one (the leading fragments, when the previous part began after its `cursor`) is
//!   found by comparing samples (a hash of each sample's bytes and duration) and skipped, so no
//!   frame is missing or repeated at a join.
//!
//! Cost: one GetClip per window when nothing is cut short (plus two small ones for the
//! fragment at `start`), one more per 200 fragments otherwise. A range that starts in a long
//! gap (hours without media) and then has more than 200 fragments re-downloads, per call, the
//! part of the previous response that the lower bound could not rule out.

use std::time::{Duration, SystemTime};

use super::fetch::Joiner;
use super::join::{Keyframe, PartScan, SampleKey, overlap, scan_part};
use super::{ClipExtractor, ClipInfo, ClipPlanning, ClipRequest, GET_CLIP_MAX_RANGE, WorkDir};
use crate::error::{Error, ErrorKind, Result};

/// A guard against a loop that makes no progress (each call moves the cursor forward by at
/// least 1 ms, so this is only reached by a range of more than this many calls).
const MAX_CALLS: usize = 100_000;

const MILLI: Duration = Duration::from_millis(1);

/// Taken off the lower bound of the next fragment's start (timestamp rounding).
const MARGIN: Duration = Duration::from_millis(5);

/// `t` + `d`, or an error naming the time (a range at the end of what `SystemTime` holds).
fn later(t: SystemTime, d: Duration) -> Result<SystemTime> {
    t.checked_add(d).ok_or_else(|| {
        Error::invalid_config(
            "ClipRequest::end",
            super::format_time(t),
            "is too far in the future to extend",
        )
    })
}

/// `t` rounded down to the millisecond (KVS's precision), so that a lower bound stays one.
fn floor_millis(t: SystemTime) -> SystemTime {
    let since = t.duration_since(SystemTime::UNIX_EPOCH).unwrap_or_default();
    let millis = u64::try_from(since.as_millis()).unwrap_or(u64::MAX);
    SystemTime::UNIX_EPOCH + Duration::from_millis(millis)
}

impl ClipExtractor {
    /// The clip of `request` with GetClip alone (see the module docs).
    pub(super) async fn download_by_time(
        &self,
        request: &ClipRequest,
        work: &WorkDir,
    ) -> Result<(ClipInfo, Option<Keyframe>)> {
        let mut join = Joiner::new(work);
        let mut first_start: Option<SystemTime> = None;
        if request.include_fragment_at_start
            && let Some(from) = self.fragment_containing_start(request, &mut join).await?
        {
            first_start = Some(from);
        }
        let mut cursor = request.start;
        // The samples of the last part, when it may have been cut short (the next response
        // can repeat its end).
        let mut previous: Option<Vec<SampleKey>> = None;
        while cursor <= request.end {
            if join.calls >= MAX_CALLS {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!("GetClip made no progress after {MAX_CALLS} calls"),
                ));
            }
            let window_end = cursor
                .checked_add(GET_CLIP_MAX_RANGE)
                .map_or(request.end, |t| t.min(request.end));
            // KVS wants End > Start.
            let call_end = window_end.max(later(cursor, MILLI)?);
            let part = join.part_path();
            let result = self.get_clip_range(request, cursor, call_end, &part).await;
            join.calls += 1;
            let bytes = match result {
                Ok(bytes) => bytes,
                Err(err) if err.kind() == ErrorKind::NoFragments => {
                    // Nothing starts in the window.
                    previous = None;
                    cursor = later(window_end, MILLI)?;
                    continue;
                }
                Err(err) => return Err(err),
            };
            let skip = match previous.take() {
                Some(previous) => {
                    let path = part.clone();
                    let scan = tokio::task::spawn_blocking(move || scan_part(&path))
                        .await
                        .map_err(|e| {
                            Error::new(ErrorKind::Internal, format!("clip scan task: {e}"))
                        })??;
                    overlap(&previous, &scan.keys)
                }
                None => 0,
            };
            let report = join.append(&part, skip).await?;
            if report.frames > 0 && first_start.is_none() {
                first_start = Some(cursor);
            }
            let keyframes = report.keys.iter().filter(|k| k.keyframe).count();
            let maybe_cut = keyframes >= self.options.max_fragments_per_call
                || bytes >= self.options.max_bytes_per_call / 2;
            tracing::debug!(
                stream = %request.stream,
                call = join.calls,
                bytes,
                keyframes,
                repeated = skip,
                frames = report.frames,
                maybe_cut,
                "GetClip part joined (by time)"
            );
            if maybe_cut {
                // Every fragment not in the clip yet starts at or after this.
                // (Less a margin for the millisecond rounding of KVS timestamps: what the
                // margin lets in again is a repeat, found and skipped.)
                let span = Duration::from(report.part_duration);
                let next = floor_millis(later(cursor, span)?)
                    .checked_sub(MARGIN)
                    .unwrap_or(cursor)
                    .max(later(cursor, MILLI)?);
                previous = Some(report.keys);
                cursor = next;
            } else {
                previous = None;
                cursor = later(window_end, MILLI)?;
            }
        }
        if join.frames == 0 {
            return Err(Error::new(
                ErrorKind::NoFragments,
                format!(
                    "no fragments in stream {} between {} and {} ({})",
                    request.stream,
                    super::format_time(request.start),
                    super::format_time(request.end),
                    request.selector.as_str()
                ),
            ));
        }
        let (frames, keyframes, calls, offset) =
            (join.frames, join.keyframes, join.calls, join.offset);
        let keyframe = join.finish().await?;
        let first = first_start.unwrap_or(request.start);
        let info = ClipInfo {
            stream: request.stream.clone(),
            path: None,
            thumbnail_path: None,
            thumbnail_error: None,
            size_bytes: 0,
            fragments: usize::try_from(keyframes).unwrap_or(usize::MAX),
            get_clip_calls: calls,
            frames,
            media_duration: Duration::from(offset),
            first_fragment_start: first,
            last_fragment_end: first.checked_add(Duration::from(offset)).unwrap_or(first),
            first_fragment_number: String::new(),
            last_fragment_number: String::new(),
            planning: ClipPlanning::GetClipOnly,
        };
        Ok((info, keyframe))
    }

    /// Appends the fragment that starts before `request.start` and still runs at it, if there
    /// is one; the start of the range that found it.
    async fn fragment_containing_start(
        &self,
        request: &ClipRequest,
        join: &mut Joiner<'_>,
    ) -> Result<Option<SystemTime>> {
        let start = request.start;
        let Some(from) = start.checked_sub(self.options.max_fragment_duration) else {
            return Ok(None);
        };
        let Some(before) = start.checked_sub(MILLI) else {
            return Ok(None);
        };
        let Some(scan) = self.probe(request, from, before, join).await? else {
            return Ok(None);
        };
        // The last fragment before `start`: from its key frame to the end of the part.
        let length = Duration::from(scan.duration.saturating_sub(scan.last_keyframe_offset));
        let length = Duration::from_millis(
            u64::try_from((length + Duration::from_micros(500)).as_millis()).unwrap_or(u64::MAX),
        );
        if length <= 2 * MILLI {
            return Ok(None);
        }
        // It runs at `start` if it starts after `start − length`.
        let Some(late) = start.checked_sub(length).and_then(|t| t.checked_add(MILLI)) else {
            return Ok(None);
        };
        let part = join.part_path();
        match self.get_clip_range(request, late, before, &part).await {
            Ok(_) => {
                join.calls += 1;
                join.append(&part, 0).await?;
                Ok(Some(late))
            }
            Err(err) if err.kind() == ErrorKind::NoFragments => {
                join.calls += 1;
                Ok(None)
            }
            Err(err) => Err(err),
        }
    }

    /// GetClip over `[from, to]`, read but not joined; `None` when nothing starts in it.
    async fn probe(
        &self,
        request: &ClipRequest,
        from: SystemTime,
        to: SystemTime,
        join: &mut Joiner<'_>,
    ) -> Result<Option<PartScan>> {
        let part = join.part_path();
        let result = self.get_clip_range(request, from, to, &part).await;
        join.calls += 1;
        match result {
            Ok(_) => {}
            Err(err) if err.kind() == ErrorKind::NoFragments => return Ok(None),
            Err(err) => return Err(err),
        }
        let path = part.clone();
        let scan = tokio::task::spawn_blocking(move || scan_part(&path))
            .await
            .map_err(|e| Error::new(ErrorKind::Internal, format!("clip scan task: {e}")))?;
        let _ = tokio::fs::remove_file(&part).await;
        scan.map(Some)
    }
}
