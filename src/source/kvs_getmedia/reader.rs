//! The control task of a [`KvsGetMediaFrameSource`](super::KvsGetMediaFrameSource): one GetMedia
//! connection at a time, its MKV read as it arrives, blocks handed to the decoder, reconnects
//! that neither lose nor repeat a frame.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesisvideomedia::types::{StartSelector, StartSelectorType};
use bytes::Bytes;
use gstreamer as gst;

use super::mkv::{Event, MkvReader, Track};
use super::{GetMediaStart, KvsGetMediaFrameSourceBuilder};
use crate::decode::{Decoder, UnitInput};
use crate::error::{Error, ErrorKind, Result};
use crate::frame::FragmentId;
use crate::kvs::{KvsClient, StreamId};
use crate::source::kvs_hls::{Ctx, fail};
use crate::source::{SourceState, TaskGuard};

/// Least time between two GetMedia calls of one source: at most 4 of the stream's 5 per second.
const MIN_CALL_SPACING: Duration = Duration::from_millis(250);

/// Room before the first fragment on the decoder timeline, for blocks with negative offsets
/// (B-frames) and producer clocks that step back by less than this.
const TIMELINE_ORIGIN: Duration = Duration::from_secs(10);

/// The tags KVS writes.
mod tag {
    pub const FRAGMENT_NUMBER: &str = "AWS_KINESISVIDEO_FRAGMENT_NUMBER";
    pub const SERVER_TIMESTAMP: &str = "AWS_KINESISVIDEO_SERVER_TIMESTAMP";
    pub const PRODUCER_TIMESTAMP: &str = "AWS_KINESISVIDEO_PRODUCER_TIMESTAMP";
    pub const MILLIS_BEHIND_NOW: &str = "AWS_KINESISVIDEO_MILLIS_BEHIND_NOW";
    pub const CONTINUATION_TOKEN: &str = "AWS_KINESISVIDEO_CONTINUATION_TOKEN";
    pub const ERROR_CODE: &str = "AWS_KINESISVIDEO_ERROR_CODE";
    pub const ERROR_ID: &str = "AWS_KINESISVIDEO_ERROR_ID";
}

/// `"1700000000.042"` (decimal seconds, KVS's timestamp tags) as a time.
pub(crate) fn parse_decimal_seconds(value: &str) -> Option<SystemTime> {
    let value = value.trim();
    let (whole, frac) = value.split_once('.').unwrap_or((value, ""));
    if whole.is_empty() || !whole.bytes().all(|b| b.is_ascii_digit()) || whole.len() > 12 {
        return None;
    }
    if !frac.bytes().all(|b| b.is_ascii_digit()) || frac.len() > 9 {
        return None;
    }
    let secs: u64 = whole.parse().ok()?;
    let mut nanos: u32 = 0;
    if !frac.is_empty() {
        let padded = format!("{frac:0<9}");
        nanos = padded.parse().ok()?;
    }
    SystemTime::UNIX_EPOCH.checked_add(Duration::new(secs, nanos))
}

/// GStreamer caps for a Matroska video track.
pub(crate) fn track_caps(track: &Track) -> Result<gst::Caps> {
    let id = track.codec_id.as_str();
    let (name, packaged) = match id {
        "V_MPEG4/ISO/AVC" | "V_MPEG/ISO/AVC" => ("video/x-h264", "avc"),
        "V_MPEGH/ISO/HEVC" | "V_MPEG/ISO/HEVC" => ("video/x-h265", "hvc1"),
        other => {
            return Err(Error::new(
                ErrorKind::UnsupportedMedia,
                format!(
                    "GetMedia track codec {other:?} is not supported (H.264 V_MPEG4/ISO/AVC or H.265 V_MPEGH/ISO/HEVC)"
                ),
            ));
        }
    };
    let mut caps = gst::Caps::builder(name).field("alignment", "au");
    caps = match &track.codec_private {
        Some(private) if !private.is_empty() => caps
            .field("stream-format", packaged)
            .field("codec_data", gst::Buffer::from_slice(private.clone())),
        // No codec private data: the parameter sets travel in the frames (Annex B).
        _ => caps.field("stream-format", "byte-stream"),
    };
    Ok(caps.build())
}

/// The fragment being read.
#[derive(Default)]
struct Current {
    number: Option<Arc<str>>,
    producer: Option<SystemTime>,
    server: Option<SystemTime>,
    timecode_scale: u64,
    cluster_timecode: Option<u64>,
    video_track: Option<u64>,
    caps: Option<gst::Caps>,
    /// Where the fragment starts on the decoder timeline (set at its first block).
    start: Option<Duration>,
    /// Video blocks of this fragment seen on this connection.
    blocks_seen: usize,
    /// Video blocks of this fragment handed to the decoder (over every connection).
    blocks_fed: usize,
    /// `AWS_KINESISVIDEO_ERROR_CODE` of the fragment's error chunk.
    error_code: Option<String>,
}

/// Where the reader is, across connections.
#[derive(Default)]
struct Position {
    /// The continuation token after the last complete fragment.
    token: Option<String>,
    /// The fragment in progress when the last connection ended: its number, producer time and
    /// the blocks already fed (skipped when it comes again).
    partial: Option<(Arc<str>, Option<SystemTime>, usize)>,
    /// Producer time at decoder timeline [`TIMELINE_ORIGIN`].
    epoch: Option<SystemTime>,
    /// The latest timeline time handed to the decoder.
    cursor: Duration,
    fragments: u64,
}

struct Reader {
    ctx: Arc<Ctx>,
    decoder: Arc<Decoder>,
    opts: KvsGetMediaFrameSourceBuilder,
    client: KvsClient,
    position: Position,
    connections: u64,
    failures: u32,
    last_call: Option<Instant>,
    /// Video blocks received on the current connection (fed or skipped as already fed).
    blocks_received: u64,
}

pub(super) async fn run(ctx: Arc<Ctx>, decoder: Arc<Decoder>, opts: KvsGetMediaFrameSourceBuilder) {
    let guard_ctx = Arc::clone(&ctx);
    let _guard = TaskGuard::new(Arc::clone(&ctx.core), move |e| {
        if !guard_ctx.stopped() {
            fail(&guard_ctx, e);
        }
    });
    let client = match opts.client.resolve().await {
        Ok(c) => c,
        Err(e) => {
            fail(&ctx, e);
            return;
        }
    };
    let mut reader = Reader {
        ctx,
        decoder,
        opts,
        client,
        position: Position::default(),
        connections: 0,
        failures: 0,
        last_call: None,
        blocks_received: 0,
    };
    reader.run().await;
}

impl Reader {
    fn camera(&self) -> &str {
        &self.ctx.camera_id
    }

    async fn run(&mut self) {
        loop {
            if self.ctx.stopped() {
                return;
            }
            let error = match self.connection().await {
                // The response ended (KVS ends it after ~3 s with nothing new, and after
                // ~45 min): `frames` went to the decoder on it.
                Ok(frames) => {
                    self.failures = 0;
                    self.ctx.core.stats.lock().consecutive_errors = 0;
                    tracing::debug!(camera = %self.camera(), frames, "GetMedia response ended; reconnecting");
                    // Nothing new for a while (camera offline): ask again after a pause.
                    if frames == 0 && self.ctx.sleep(Duration::from_secs(1)).await.is_err() {
                        return;
                    }
                    continue;
                }
                Err(e) if e.kind() == ErrorKind::Stopped => return,
                Err(e) => e,
            };
            let error = self.confirm_fatal(error).await;
            self.ctx.count_read_error(&error);
            if !error.is_transient() {
                fail(&self.ctx, error);
                return;
            }
            self.failures += 1;
            self.ctx.note_failure(self.failures);
            if self.opts.common.backoff.exhausted(self.failures) {
                let n = self.failures;
                fail(
                    &self.ctx,
                    error.context(format!("giving up after {n} consecutive errors")),
                );
                return;
            }
            if matches!(
                error.kind(),
                ErrorKind::Network | ErrorKind::ServiceUnavailable | ErrorKind::Timeout
            ) {
                self.client.invalidate_endpoint(
                    &self.opts.stream,
                    aws_sdk_kinesisvideo::types::ApiName::GetMedia,
                );
            }
            // A connection cut after frames flowed is resumed at once; repeated failures back off.
            let delay = if self.failures == 1 && self.ctx.core.stats.lock().frames_delivered > 0 {
                Duration::ZERO
            } else {
                self.opts.common.backoff.delay(self.failures)
            };
            tracing::warn!(camera = %self.camera(), %error, ?delay, attempt = self.failures, "GetMedia: reconnecting");
            self.ctx.note_reconnect(delay);
            if self.ctx.sleep(delay).await.is_err() {
                return;
            }
        }
    }

    /// The start selector of the next connection: after the last complete fragment (its
    /// continuation token, which KVS writes with every complete fragment), else at the
    /// fragment in progress, else the configured start.
    fn selector(&self) -> Result<StartSelector> {
        let b = StartSelector::builder();
        let b = if let Some(token) = &self.position.token {
            b.start_selector_type(StartSelectorType::ContinuationToken)
                .continuation_token(token)
        } else if let Some((_, Some(producer), _)) = &self.position.partial {
            b.start_selector_type(StartSelectorType::ProducerTimestamp)
                .start_timestamp(aws_smithy_types::DateTime::from(*producer))
        } else {
            match &self.opts.start {
                GetMediaStart::Now => b.start_selector_type(StartSelectorType::Now),
                GetMediaStart::Earliest => b.start_selector_type(StartSelectorType::Earliest),
                GetMediaStart::ProducerTimestamp(t) => b
                    .start_selector_type(StartSelectorType::ProducerTimestamp)
                    .start_timestamp(aws_smithy_types::DateTime::from(*t)),
                GetMediaStart::ServerTimestamp(t) => b
                    .start_selector_type(StartSelectorType::ServerTimestamp)
                    .start_timestamp(aws_smithy_types::DateTime::from(*t)),
                GetMediaStart::AfterFragmentNumber(n) => b
                    .start_selector_type(StartSelectorType::FragmentNumber)
                    .after_fragment_number(n),
                GetMediaStart::ContinuationToken(t) => b
                    .start_selector_type(StartSelectorType::ContinuationToken)
                    .continuation_token(t),
            }
        };
        b.build()
            .map_err(|e| Error::new(ErrorKind::Internal, format!("GetMedia start selector: {e}")))
    }

    /// One GetMedia connection, read to its end: how many blocks went to the decoder.
    async fn connection(&mut self) -> Result<u64> {
        if let Some(last) = self.last_call {
            let since = last.elapsed();
            if since < MIN_CALL_SPACING {
                self.ctx.sleep(MIN_CALL_SPACING - since).await?;
            }
        }
        self.last_call = Some(Instant::now());
        let media = self.client.media(&self.opts.stream).await?;
        let mut request = media.get_media().start_selector(self.selector()?);
        request = match &self.opts.stream {
            StreamId::Name(n) => request.stream_name(n),
            StreamId::Arn(a) => request.stream_arn(a),
        };
        let output = tokio::select! {
            r = request.send() => r.map_err(|e| Error::from_sdk("GetMedia", e).context(format!("stream {}", self.opts.stream)))?,
            () = self.ctx.stop_notify.notified() => return Err(crate::source::stopped()),
        };
        self.connections += 1;
        self.ctx.core.stats.lock().sessions = self.connections;
        self.ctx.set_state(SourceState::Connected);
        tracing::info!(camera = %self.camera(), connection = self.connections, "GetMedia connected");
        self.blocks_received = 0;
        let mut payload = output.payload;
        let mut mkv = MkvReader::new();
        let mut current = Current::default();
        let mut frames: u64 = 0;
        let result = loop {
            let chunk = tokio::select! {
                c = tokio::time::timeout(self.opts.read_timeout, payload.next()) => c,
                () = self.ctx.stop_notify.notified() => break Err(crate::source::stopped()),
            };
            let bytes = match chunk {
                Err(_) => {
                    break Err(Error::new(
                        ErrorKind::Timeout,
                        format!("GetMedia sent nothing for {:?}", self.opts.read_timeout),
                    ));
                }
                Ok(None) => break Ok(()),
                Ok(Some(Err(e))) => {
                    break Err(Error::new(
                        ErrorKind::Network,
                        format!("GetMedia connection broke: {e}"),
                    ));
                }
                Ok(Some(Ok(b))) => b,
            };
            self.ctx.core.stats.lock().bytes_fetched += bytes.len() as u64;
            mkv.push(&bytes);
            let step = loop {
                match mkv.next() {
                    Ok(Some(event)) => match self.handle(event, &mut current).await {
                        Ok(fed) => frames += fed,
                        Err(e) => break Err(e),
                    },
                    Ok(None) => break Ok(()),
                    Err(e) => break Err(e),
                }
            };
            if let Err(e) = step {
                break Err(e);
            }
        };
        // The fragment in progress: resumed (without its blocks already fed) next time. A
        // connection that ended while still skipping the fed blocks fed none of its own: the
        // count only grows.
        if let (Some(number), true) = (current.number.clone(), current.blocks_fed > 0) {
            let fed = match &self.position.partial {
                Some((n, _, f)) if *n == number => (*f).max(current.blocks_fed),
                _ => current.blocks_fed,
            };
            tracing::debug!(camera = %self.camera(), fragment = %number, fed, "GetMedia: connection ended inside a fragment");
            self.position.partial = Some((number, current.producer, fed));
        }
        // A connection that carried video made progress (even if all of it had been delivered
        // before): the next failure is a first one again, resumed at once.
        if self.blocks_received > 0 {
            self.failures = 0;
        }
        result.map(|()| frames)
    }

    /// Handles one payload event; returns how many blocks went to the decoder.
    async fn handle(&mut self, event: Event, current: &mut Current) -> Result<u64> {
        match event {
            Event::Document => {
                // A new fragment: whatever was in progress is not coming back on this
                // connection (KVS would have sent its end tags).
                *current = Current {
                    timecode_scale: 1_000_000,
                    ..Current::default()
                };
            }
            Event::TimecodeScale(scale) => {
                if scale == 0 || scale > 1_000_000_000 {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!("GetMedia: TimecodeScale {scale} is not valid"),
                    ));
                }
                current.timecode_scale = scale;
            }
            Event::Track(track) => {
                if current.video_track.is_none() {
                    current.caps = Some(track_caps(&track)?);
                    current.video_track = Some(track.number);
                }
            }
            Event::Tag { name, value } => self.tag(&name, &value, current)?,
            Event::Cluster | Event::ClusterEnd => {}
            Event::ClusterTimecode(t) => current.cluster_timecode = Some(t),
            Event::Block {
                track,
                timecode,
                key,
                data,
            } => {
                if current.video_track != Some(track) {
                    return Ok(0);
                }
                return self.block(timecode, key, data, current).await;
            }
        }
        Ok(0)
    }

    fn tag(&mut self, name: &str, value: &str, current: &mut Current) -> Result<()> {
        match name {
            tag::FRAGMENT_NUMBER => current.number = Some(Arc::from(value)),
            tag::PRODUCER_TIMESTAMP => current.producer = parse_decimal_seconds(value),
            tag::SERVER_TIMESTAMP => current.server = parse_decimal_seconds(value),
            tag::MILLIS_BEHIND_NOW => {}
            tag::CONTINUATION_TOKEN => {
                // The fragment is complete.
                self.position.token = Some(value.to_owned());
                self.position.partial = None;
                self.position.fragments += 1;
                self.ctx.core.stats.lock().fragments_fetched += 1;
                current.blocks_fed = 0;
                current.number = None;
            }
            tag::ERROR_CODE => current.error_code = Some(value.to_owned()),
            tag::ERROR_ID => {
                let code = current.error_code.clone().unwrap_or_default();
                let id: u32 = value.trim().parse().unwrap_or(0);
                // 4000: fragment not found; 4500–4504: the stream's KMS key is unusable (an IAM
                // or key-policy matter): fatal. Anything else KVS reports mid-stream (3002
                // write error, 5000 internal) is worth a reconnect.
                let kind = match id {
                    4500..=4504 => ErrorKind::NotAuthorized,
                    _ => ErrorKind::ServiceUnavailable,
                };
                return Err(Error::new(
                    kind,
                    format!(
                        "GetMedia error tag: AWS_KINESISVIDEO_ERROR_CODE {code:?}, AWS_KINESISVIDEO_ERROR_ID {id}"
                    ),
                ));
            }
            _ => {}
        }
        Ok(())
    }

    async fn block(
        &mut self,
        timecode: i16,
        key: bool,
        data: Bytes,
        current: &mut Current,
    ) -> Result<u64> {
        current.blocks_seen += 1;
        self.blocks_received += 1;
        // Resuming a fragment cut on an earlier connection: skip what was fed then.
        if let (Some((number, _, fed)), Some(this)) = (&self.position.partial, &current.number)
            && number == this
            && current.blocks_seen <= *fed
        {
            current.blocks_fed = current.blocks_seen;
            return Ok(0);
        }
        let Some(caps) = current.caps.clone() else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "GetMedia: a block before any video track entry",
            ));
        };
        let scale = u128::from(current.timecode_scale.max(1));
        // The fragment's producer time: its tag, else the cluster's (absolute) timecode.
        let producer = current.producer.or_else(|| {
            let ns = u128::from(current.cluster_timecode?) * scale;
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_nanos(u64::try_from(ns).ok()?))
        });
        let Some(producer) = producer else {
            return Err(Error::new(
                ErrorKind::Protocol,
                "GetMedia: a fragment without AWS_KINESISVIDEO_PRODUCER_TIMESTAMP or cluster timecode",
            ));
        };
        let epoch = *self
            .position
            .epoch
            .get_or_insert_with(|| producer.checked_sub(TIMELINE_ORIGIN).unwrap_or(producer));
        let mut fragment = None;
        let start = match current.start {
            Some(s) => s,
            None => {
                // On the timeline: producer time − epoch, never before what was fed (a producer
                // clock that stepped back goes on right after the previous frames).
                let natural = producer.duration_since(epoch).unwrap_or_default();
                let floor = if self.position.cursor.is_zero() {
                    Duration::ZERO
                } else {
                    self.position.cursor + Duration::from_millis(1)
                };
                let start = natural.max(floor);
                current.start = Some(start);
                fragment = Some((
                    start,
                    FragmentId {
                        program_date_time: Some(producer),
                        media_sequence: self.position.fragments,
                        session: self.connections,
                        fragment_number: current.number.clone(),
                        server_time: current.server,
                    },
                ));
                start
            }
        };
        let offset_ns = i128::from(timecode) * i128::try_from(scale).unwrap_or(1_000_000);
        let start_ns = i128::try_from(start.as_nanos()).unwrap_or(i128::MAX);
        let pts_ns = (start_ns + offset_ns).max(0);
        let pts = Duration::from_nanos(u64::try_from(pts_ns).unwrap_or(u64::MAX));
        if pts > self.position.cursor {
            self.position.cursor = pts;
        }
        if self.position.fragments == 0 && current.blocks_fed == 0 && fragment.is_some() {
            self.ctx.reset_progress();
        }
        self.decoder
            .push_unit(UnitInput {
                caps,
                data,
                pts,
                key,
                fragment,
            })
            .await?;
        current.blocks_fed += 1;
        Ok(1)
    }

    /// A "not found" is checked with DescribeStream before the source gives up.
    async fn confirm_fatal(&self, error: Error) -> Error {
        crate::source::kvs_hls::confirm_stream_gone(&self.client, &self.opts.stream, error).await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decimal_seconds_parse_exactly() {
        let t = parse_decimal_seconds("1700000000.042").unwrap();
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH).unwrap(),
            Duration::from_millis(1_700_000_000_042)
        );
        assert_eq!(
            parse_decimal_seconds("12"),
            SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs(12))
        );
        for bad in [
            "",
            ".5",
            "1e9",
            "-1.0",
            "1.2.3",
            "99999999999999.0",
            "1.0000000001",
            "abc",
        ] {
            assert_eq!(parse_decimal_seconds(bad), None, "{bad}");
        }
    }

    #[test]
    fn caps_follow_the_codec_id() {
        let mut t = Track {
            number: 1,
            codec_id: "V_MPEG4/ISO/AVC".into(),
            codec_private: Some(Bytes::from_static(&[1, 2, 3])),
            width: None,
            height: None,
        };
        crate::elements::init().unwrap();
        let caps = track_caps(&t).unwrap();
        let s = caps.structure(0).unwrap();
        assert_eq!(s.name(), "video/x-h264");
        assert_eq!(s.get::<&str>("stream-format").unwrap(), "avc");
        t.codec_private = None;
        let caps = track_caps(&t).unwrap();
        assert_eq!(
            caps.structure(0)
                .unwrap()
                .get::<&str>("stream-format")
                .unwrap(),
            "byte-stream"
        );
        t.codec_id = "V_MPEGH/ISO/HEVC".into();
        assert_eq!(
            track_caps(&t).unwrap().structure(0).unwrap().name(),
            "video/x-h265"
        );
        t.codec_id = "V_VP8".into();
        let err = track_caps(&t).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::UnsupportedMedia);
        assert!(err.to_string().contains("V_VP8"));
    }

    proptest::proptest! {
        #[test]
        fn decimal_seconds_never_panic(s in "\\PC{0,40}") {
            let _ = parse_decimal_seconds(&s);
        }
    }
}
