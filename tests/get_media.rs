//! GetMedia: the emulator's MKV payload (read by the AWS SDK and decoded by GStreamer's
//! `matroskademux`) and `KvsGetMediaFrameSource` against it, with the frame-number barcode as
//! ground truth across cut connections, ended connections and error tags.

mod common;

use std::time::{Duration, Instant};

use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideomedia::types::{StartSelector, StartSelectorType};
use bytes::BytesMut;
use ebml_iterable::TagDecoder;
use kvs_emulator::{Emulator, barcode};
use kvs_frames::{
    Frame, GetMediaStart, KvsGetMediaFrameSource, KvsGetMediaFrameSourceBuilder, PixelFormat,
};
use webm_iterable::matroska_spec::{Master, MatroskaSpec, SimpleBlock};

/// A GetMedia client at the stream's GET_MEDIA endpoint, without the SDK's retries (so that
/// the tests see each refusal).
async fn media_client(emulator: &Emulator, stream: &str) -> aws_sdk_kinesisvideomedia::Client {
    let endpoint = common::data_endpoint(emulator, stream, ApiName::GetMedia).await;
    let config = aws_sdk_kinesisvideomedia::config::Builder::from(&emulator.sdk_config())
        .endpoint_url(endpoint)
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    aws_sdk_kinesisvideomedia::Client::from_conf(config)
}

fn selector(
    kind: StartSelectorType,
) -> aws_sdk_kinesisvideomedia::types::builders::StartSelectorBuilder {
    StartSelector::builder().start_selector_type(kind)
}

/// One fragment of a payload, as read by webm-iterable.
#[derive(Debug, Default, Clone)]
struct Fragment {
    tags: Vec<(String, String)>,
    cluster_timecode: Option<u64>,
    blocks: Vec<(i16, bool, usize)>,
}

impl Fragment {
    fn tag(&self, name: &str) -> Option<&str> {
        self.tags
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

fn parse(payload: &[u8]) -> Vec<Fragment> {
    let mut decoder: TagDecoder<MatroskaSpec> =
        TagDecoder::new(&[MatroskaSpec::SimpleTag(Master::Start)]);
    let mut input = BytesMut::from(payload);
    let mut fragments: Vec<Fragment> = Vec::new();
    loop {
        let tag = match decoder.decode(&mut input).expect("valid MKV") {
            Some(t) => t.tag,
            None => match decoder.decode_eof(&mut input).expect("complete MKV") {
                Some(t) => t.tag,
                None => break,
            },
        };
        match tag {
            MatroskaSpec::Ebml(Master::Start) => fragments.push(Fragment::default()),
            MatroskaSpec::SimpleTag(Master::Full(children)) => {
                let mut name = String::new();
                let mut value = String::new();
                for c in children {
                    match c {
                        MatroskaSpec::TagName(n) => name = n,
                        MatroskaSpec::TagString(v) => value = v,
                        _ => {}
                    }
                }
                fragments
                    .last_mut()
                    .expect("a fragment")
                    .tags
                    .push((name, value));
            }
            MatroskaSpec::Timestamp(t) => {
                fragments.last_mut().expect("fragment").cluster_timecode = Some(t)
            }
            ref t @ MatroskaSpec::SimpleBlock(_) => {
                let b = SimpleBlock::try_from(t).expect("simple block");
                fragments.last_mut().expect("fragment").blocks.push((
                    b.timestamp,
                    b.keyframe,
                    b.raw_frame_data().len(),
                ));
            }
            _ => {}
        }
    }
    fragments
}

/// The whole body of a GetMedia response (it ends after 3 s without anything new).
async fn read_body(
    output: aws_sdk_kinesisvideomedia::operation::get_media::GetMediaOutput,
) -> Vec<u8> {
    output
        .payload
        .collect()
        .await
        .expect("body")
        .into_bytes()
        .to_vec()
}

fn number(frame: &Frame) -> u32 {
    barcode::read_gray8(
        frame.data(),
        frame.stride(),
        frame.width() as usize,
        frame.height() as usize,
    )
    .unwrap_or_else(|| panic!("unreadable barcode in {frame:?}"))
}

fn source(emulator: &Emulator, stream: &str) -> KvsGetMediaFrameSourceBuilder {
    KvsGetMediaFrameSource::builder("getmedia-camera", stream)
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Gray8)
}

/// An archive's payload from EARLIEST: one EBML document per fragment with KVS's tags, the
/// frames of the ground truth, a continuation token after each cluster; `matroskademux`
/// (GStreamer's, not this project's reader) decodes the whole payload to every frame in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_payload_is_kvs_shaped_mkv_that_matroskademux_decodes() {
    let emulator = common::start(vec![
        common::small("archive")
            .live(false)
            .history(Duration::from_secs(4)),
    ]);
    common::wait_fragments(&emulator, "archive", 4, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("archive");
    let client = media_client(&emulator, "archive").await;
    let output = client
        .get_media()
        .stream_name("archive")
        .start_selector(selector(StartSelectorType::Earliest).build().unwrap())
        .send()
        .await
        .expect("GetMedia");
    assert_eq!(output.content_type(), Some("video/webm"));
    let started = Instant::now();
    let payload = read_body(output).await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the response ends only after ~3 s without anything new"
    );
    let fragments = parse(&payload);
    assert_eq!(fragments.len(), truth.len(), "{fragments:?}");
    for (f, record) in fragments.iter().zip(&truth) {
        assert_eq!(
            f.tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER"),
            Some(record.fragment_number.as_str())
        );
        let ms =
            |t: std::time::SystemTime| t.duration_since(std::time::UNIX_EPOCH).unwrap().as_millis();
        let producer = f
            .tag("AWS_KINESISVIDEO_PRODUCER_TIMESTAMP")
            .expect("producer tag");
        assert_eq!(
            producer,
            format!(
                "{}.{:03}",
                ms(record.producer_start) / 1000,
                ms(record.producer_start) % 1000
            )
        );
        assert!(f.tag("AWS_KINESISVIDEO_SERVER_TIMESTAMP").is_some());
        assert!(f.tag("AWS_KINESISVIDEO_MILLIS_BEHIND_NOW").is_some());
        let token = f.tag("AWS_KINESISVIDEO_CONTINUATION_TOKEN").expect("token");
        assert!(token.len() <= 128 && !token.bytes().all(|b| b.is_ascii_digit()));
        assert_eq!(f.cluster_timecode, Some(ms(record.producer_start) as u64));
        assert_eq!(f.blocks.len(), record.frame_count as usize);
        assert!(f.blocks[0].1, "a fragment starts with a key frame");
        // 25 fps: block timecodes are 40 ms apart from 0.
        let times: Vec<i16> = f.blocks.iter().map(|b| b.0).collect();
        assert_eq!(
            times,
            (0..record.frame_count as i16)
                .map(|i| i * 40)
                .collect::<Vec<_>>()
        );
    }
    let decoded = common::decode_mp4(&payload);
    let numbers: Vec<u32> = decoded
        .iter()
        .map(|d| d.frame_number.expect("barcode"))
        .collect();
    let expected: Vec<u32> = truth
        .iter()
        .flat_map(|r| (r.first_frame..r.first_frame + u64::from(r.frame_count)).map(|n| n as u32))
        .collect();
    assert_eq!(numbers, expected);
}

/// Continuation tokens, fragment numbers and timestamps select the fragments KVS documents.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_start_selector_picks_its_fragment() {
    let emulator = common::start(vec![
        common::small("sel")
            .live(false)
            .history(Duration::from_secs(5)),
    ]);
    common::wait_fragments(&emulator, "sel", 5, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("sel");
    let client = media_client(&emulator, "sel").await;
    let first = |s: StartSelector| {
        let client = client.clone();
        async move {
            let out = client
                .get_media()
                .stream_name("sel")
                .start_selector(s)
                .send()
                .await
                .expect("GetMedia");
            parse(&read_body(out).await)
        }
    };
    let all = first(selector(StartSelectorType::Earliest).build().unwrap()).await;
    let token = all[1]
        .tag("AWS_KINESISVIDEO_CONTINUATION_TOKEN")
        .unwrap()
        .to_owned();
    let after_token = first(
        selector(StartSelectorType::ContinuationToken)
            .continuation_token(token)
            .build()
            .unwrap(),
    )
    .await;
    assert_eq!(
        after_token[0].tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER"),
        Some(truth[2].fragment_number.as_str()),
        "a continuation token goes on after its fragment"
    );
    assert_eq!(after_token.len(), truth.len() - 2);
    let after_number = first(
        selector(StartSelectorType::FragmentNumber)
            .after_fragment_number(&truth[0].fragment_number)
            .build()
            .unwrap(),
    )
    .await;
    assert_eq!(
        after_number[0].tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER"),
        Some(truth[1].fragment_number.as_str())
    );
    // Inside fragment 3: that fragment, from its start.
    let inside = truth[3].producer_start + Duration::from_millis(300);
    let at_time = first(
        selector(StartSelectorType::ProducerTimestamp)
            .start_timestamp(aws_smithy_types::DateTime::from(inside))
            .build()
            .unwrap(),
    )
    .await;
    assert_eq!(
        at_time[0].tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER"),
        Some(truth[3].fragment_number.as_str())
    );
    let server = truth[2].server_start;
    let at_server = first(
        selector(StartSelectorType::ServerTimestamp)
            .start_timestamp(aws_smithy_types::DateTime::from(server))
            .build()
            .unwrap(),
    )
    .await;
    assert_eq!(
        at_server[0].tag("AWS_KINESISVIDEO_FRAGMENT_NUMBER"),
        Some(truth[2].fragment_number.as_str())
    );
    // A selector without what its type needs, and a bad token, are InvalidArgumentException.
    for bad in [
        selector(StartSelectorType::ProducerTimestamp)
            .build()
            .unwrap(),
        selector(StartSelectorType::ContinuationToken)
            .continuation_token("not-a-token")
            .build()
            .unwrap(),
    ] {
        let err = client
            .get_media()
            .stream_name("sel")
            .start_selector(bad)
            .send()
            .await
            .expect_err("refused");
        let e = kvs_frames::Error::from_sdk("GetMedia", err);
        assert_eq!(e.kind(), kvs_frames::ErrorKind::InvalidArgument, "{e}");
    }
}

/// Three connections per stream, the fourth refused; five calls a second, the sixth throttled;
/// the emulator's counters say so.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connection_and_call_rate_limits_are_enforced() {
    let emulator = common::start(vec![common::small("lim")]);
    let client = media_client(&emulator, "lim").await;
    let call = || {
        client
            .get_media()
            .stream_name("lim")
            .start_selector(selector(StartSelectorType::Now).build().unwrap())
            .send()
    };
    let mut open = Vec::new();
    for _ in 0..3 {
        open.push(call().await.expect("one of three connections"));
    }
    let fourth = call().await.expect_err("a fourth connection");
    let e = kvs_frames::Error::from_sdk("GetMedia", fourth);
    assert_eq!(
        e.aws_error_code(),
        Some("ConnectionLimitExceededException"),
        "{e}"
    );
    assert_eq!(e.kind(), kvs_frames::ErrorKind::Throttled);
    let stats = emulator.get_media_stats("lim").unwrap();
    assert_eq!(stats.open_connections, 3);
    assert_eq!(stats.max_concurrent_connections, 3);
    assert_eq!(stats.connection_limit_refusals, 1);
    // The connections stream frames as the camera makes them.
    let mut first = open.remove(0);
    let chunk = tokio::time::timeout(Duration::from_secs(5), first.payload.next())
        .await
        .expect("data within 5 s")
        .expect("a chunk")
        .expect("bytes");
    assert!(!chunk.is_empty());
    drop(first);
    drop(open);
    // Closing releases the slots.
    let deadline = Instant::now() + Duration::from_secs(5);
    while emulator.get_media_stats("lim").unwrap().open_connections > 0 {
        assert!(Instant::now() < deadline, "slots not released");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Calls per second: wait for a quiet second, then six at once (each closed at once).
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let mut throttled = 0;
    for _ in 0..6 {
        match call().await {
            Ok(out) => drop(out),
            Err(err) => {
                let e = kvs_frames::Error::from_sdk("GetMedia", err);
                if e.aws_error_code() == Some("ClientLimitExceededException") {
                    throttled += 1;
                }
            }
        }
    }
    let stats = emulator.get_media_stats("lim").unwrap();
    assert!(throttled >= 1, "{stats:?}");
    assert!(stats.throttled_calls >= 1);
    assert!(stats.max_concurrent_connections <= 3);
}

/// The source reads live frames in order with the camera's producer times, frame by frame:
/// most frames reach the reader before their fragment is complete at the emulator (HLS cannot
/// serve a frame before that).
#[test]
fn live_frames_arrive_in_order_with_producer_times_before_their_fragment_completes() {
    let emulator = common::start(vec![common::small("live")]);
    let source = source(&emulator, "live").build().unwrap();
    let mut early = 0;
    let mut frames = Vec::new();
    let mut iter = source.frames();
    while frames.len() < 75 {
        let (frame, ts) = iter
            .next_timeout(Duration::from_secs(10))
            .expect("a frame")
            .expect("no error");
        assert_eq!(Some(ts), frame.producer_time());
        let n = u64::from(number(&frame));
        // The fragment holding frame n is published once its last frame is encoded.
        let published = emulator
            .ground_truth("live")
            .iter()
            .any(|r| (r.first_frame..r.first_frame + u64::from(r.frame_count)).contains(&n));
        if !published {
            early += 1;
        }
        let id = frame.fragment().expect("fragment identity");
        assert!(id.fragment_number.is_some() && id.server_time.is_some());
        frames.push((n, frame.producer_time()));
    }
    for pair in frames.windows(2) {
        assert_eq!(pair[1].0, pair[0].0 + 1, "gap or repeat: {frames:?}");
    }
    for (n, t) in &frames {
        assert_eq!(
            *t,
            emulator.frame_producer_time("live", *n),
            "producer time of frame {n}"
        );
    }
    assert!(
        early >= 40,
        "only {early} of 75 frames came before their fragment was complete"
    );
    let stats = source.stats();
    assert_eq!(stats.sessions, 1, "{stats:?}");
    assert_eq!(stats.reconnects, 0);
}

/// A connection cut in the middle of a cluster, a connection that ends (its lifetime) and an
/// error tag: the reader resumes each time, and the barcodes show every frame once, in order.
#[test]
fn cut_and_ended_connections_and_error_tags_lose_and_repeat_nothing() {
    let emulator = common::start(vec![common::small("faulty")]);
    let faults = emulator.faults("faulty").unwrap();
    let source = source(&emulator, "faulty").build().unwrap();
    let mut iter = source.frames();
    let mut numbers = Vec::new();
    let mut next = |numbers: &mut Vec<u64>| {
        let (frame, _) = iter
            .next_timeout(Duration::from_secs(15))
            .unwrap_or_else(|| {
                panic!(
                    "no frame after {numbers:?}: {:?} {:?}",
                    source.stats(),
                    emulator.get_media_stats("faulty")
                )
            })
            .expect("no error");
        numbers.push(u64::from(number(&frame)));
    };
    for _ in 0..20 {
        next(&mut numbers);
    }
    // Cut after 12 more frames: inside a 25-frame fragment.
    faults.cut_get_media_after(12);
    for _ in 0..40 {
        next(&mut numbers);
    }
    faults.get_media_error("WRITE_ERROR", 3002);
    for _ in 0..40 {
        next(&mut numbers);
    }
    // Cuts in a row: the connections after a cut send the cut fragment again from its key
    // frame, and are themselves cut after 14 and then 4 frames, while still sending what was
    // delivered already (the count of delivered frames must not shrink).
    faults.cut_get_media_connections(&[14, 4]);
    faults.cut_get_media_after(20);
    for _ in 0..60 {
        next(&mut numbers);
    }
    // Connections opened from now on end after 1.3 s, mid-fragment.
    faults.get_media_lifetime(Some(Duration::from_millis(1300)));
    faults.cut_get_media_after(5);
    for _ in 0..100 {
        next(&mut numbers);
    }
    faults.get_media_lifetime(None);
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1, "gap or repeat in {numbers:?}");
    }
    let stats = source.stats();
    assert!(stats.sessions >= 4, "{stats:?}");
    let media = emulator.get_media_stats("faulty").unwrap();
    assert!(media.max_concurrent_connections <= 3, "{media:?}");
    assert_eq!(media.throttled_calls, 0, "{media:?}");
    assert_eq!(media.connection_limit_refusals, 0, "{media:?}");
}

/// `Earliest` reads an archive from its first frame, and a bad start is a typed error naming it.
#[test]
fn earliest_reads_an_archive_and_bad_starts_are_refused() {
    let emulator = common::start(vec![
        common::small("arch")
            .live(false)
            .history(Duration::from_secs(3)),
    ]);
    assert!(emulator.wait_for_fragments("arch", 3, Duration::from_secs(30)));
    let truth = emulator.ground_truth("arch");
    let source = source(&emulator, "arch")
        .start(GetMediaStart::Earliest)
        .build()
        .unwrap();
    let total: u32 = truth.iter().map(|r| r.frame_count).sum();
    let frames = common::frames::take_frames(
        source.frames(),
        total as usize,
        Duration::from_secs(15),
        || source.stats(),
    );
    let numbers: Vec<u64> = frames.iter().map(|f| u64::from(number(f))).collect();
    assert_eq!(numbers.first(), Some(&truth[0].first_frame));
    for pair in numbers.windows(2) {
        assert_eq!(pair[1], pair[0] + 1);
    }
    let err = KvsGetMediaFrameSource::builder("x", "arch")
        .sdk_config(&emulator.sdk_config())
        .start(GetMediaStart::AfterFragmentNumber("12ab".into()))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), kvs_frames::ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("12ab"), "{err}");
}

/// A GetMedia source is a `SourceSet` member like the others: beside an HLS reader of the same
/// camera, both deliver in order.
#[test]
fn a_get_media_source_joins_a_source_set() {
    let emulator = common::start(vec![common::small("set")]);
    let set = kvs_frames::SourceSet::new();
    set.add(source(&emulator, "set").build().unwrap()).unwrap();
    set.add(
        kvs_frames::KvsHlsFrameSource::builder("hls", "set")
            .sdk_config(&emulator.sdk_config())
            .pixel_format(PixelFormat::Gray8)
            .build()
            .unwrap(),
    )
    .unwrap();
    let mut seen: std::collections::BTreeMap<String, Vec<u32>> = Default::default();
    let deadline = Instant::now() + Duration::from_secs(40);
    for (camera, item) in set.frames() {
        let (frame, _) = item.expect("no error");
        seen.entry(camera.to_string())
            .or_default()
            .push(number(&frame));
        if seen.values().filter(|v| v.len() >= 30).count() == 2 {
            break;
        }
        assert!(Instant::now() < deadline, "{seen:?}");
    }
    for (camera, numbers) in &seen {
        for pair in numbers.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "{camera}: {numbers:?}");
        }
    }
    assert!(seen.contains_key("getmedia-camera") && seen.contains_key("hls"));
    set.stop();
}

/// H.265 and H.264 with B-frames over GetMedia: blocks come in decode order with presentation
/// timecodes; every frame is delivered once, in order, at its producer time.
#[test]
fn h265_and_b_frame_streams_decode_every_frame_with_exact_producer_times() {
    let emulator = common::start(vec![
        common::small("hevc").codec(kvs_emulator::VideoCodec::H265),
        common::small("bframes").b_frames(2, kvs_emulator::CompositionOffsets::Positive),
    ]);
    for stream in ["hevc", "bframes"] {
        let source = source(&emulator, stream)
            .start(GetMediaStart::Earliest)
            .build()
            .unwrap();
        let frames =
            common::frames::take_frames(source.frames(), 60, Duration::from_secs(15), || {
                source.stats()
            });
        let numbers: Vec<u64> = frames.iter().map(|f| u64::from(number(f))).collect();
        for pair in numbers.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "{stream}: {numbers:?}");
        }
        for (frame, n) in frames.iter().zip(&numbers) {
            assert_eq!(
                frame.producer_time(),
                emulator.frame_producer_time(stream, *n),
                "{stream}: producer time of frame {n}"
            );
        }
    }
}
