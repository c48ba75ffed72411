//! Steps 1–3 of a clip: the stream's status, every `ListFragments` page of the range, the
//! selection of the clip's fragments ([`FragmentInfo`]), and how many of them one `GetClip` call
//! takes (KVS's 200 fragment / 100 MB / 24 h limits) and a part turned out to hold.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types::{Fragment, FragmentSelector, TimestampRange};
use aws_smithy_types::DateTime;
use gstreamer as gst;

use super::{
    ClipExtractor, ClipPlanning, ClipRequest, GET_CLIP_MAX_RANGE, MAX_PAGES, TimestampSelector,
    format_time,
};
use crate::error::{Error, ErrorKind, Result};
use crate::kvs::client::StreamId;
use crate::kvs::discovery::{describe_stream, retry};

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

/// How a clip is downloaded.
pub(super) enum Plan {
    /// These fragments, listed by `ListFragments`.
    Listed(Vec<FragmentInfo>),
    /// GetClip alone, by time ([`ClipPlanning::GetClipOnly`]).
    ByTime,
}

impl ClipExtractor {
    /// Status check, then ListFragments and the selection, or GetClip alone where
    /// ListFragments is refused ([`ClipPlanning`]).
    pub(super) async fn plan_clip(&self, request: &ClipRequest) -> Result<Plan> {
        let by_time = match self.options.planning {
            ClipPlanning::GetClipOnly => true,
            ClipPlanning::ListFragments => false,
            ClipPlanning::Auto => self.client.list_fragments_refused().is_some(),
        };
        if by_time {
            self.check_status(request).await?;
            return Ok(Plan::ByTime);
        }
        match self.plan(request).await {
            Ok(fragments) => Ok(Plan::Listed(fragments)),
            // `list_fragments` noted the refusal of the call itself (not of GetDataEndpoint or
            // DescribeStream, which GetClip needs as well).
            Err(err)
                if self.options.planning == ClipPlanning::Auto
                    && refused(err.kind())
                    && self.client.list_fragments_refused().is_some() =>
            {
                Ok(Plan::ByTime)
            }
            Err(err) => Err(err),
        }
    }

    /// A stream that is not ACTIVE is refused (when [`ClipOptions::check_stream_status`]).
    ///
    /// [`ClipOptions::check_stream_status`]: super::ClipOptions::check_stream_status
    async fn check_status(&self, request: &ClipRequest) -> Result<()> {
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
        Ok(())
    }

    /// Status check, ListFragments, selection.
    pub(super) async fn plan(&self, request: &ClipRequest) -> Result<Vec<FragmentInfo>> {
        self.check_status(request).await?;
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
                    if let Err(err) = &result
                        && refused(err.kind())
                        && self.client.note_list_fragments_refused(err.kind())
                    {
                        tracing::info!(
                            %stream,
                            error = %err,
                            "ListFragments is refused to this client: with ClipPlanning::Auto \
                             its clips use GetClip alone, by time, from now on"
                        );
                    }
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
}

/// Whether a failed ListFragments call says the operation is unavailable (IAM, endpoint).
fn refused(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::NotAuthorized | ErrorKind::UnsupportedOperation
    )
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
pub(super) fn chunk_len(
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
pub(super) fn covered_fragments(chunk: &[FragmentInfo], duration: gst::ClockTime) -> usize {
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
}
