//! Stream discovery, clip extraction (ListFragments + GetClip, split and joined) and retention,
//! against the emulator over real HTTP, with clips decoded by real GStreamer and checked frame by
//! frame against the emulator's ground truth.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_sdk_kinesisvideoarchivedmedia::types::{
    FragmentSelector, FragmentSelectorType, TimestampRange,
};
use common::{dt, small};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_emulator::{
    CompositionOffsets, Emulator, FragmentRecord, Refusal, StreamSpec, StreamStatus, VideoCodec,
    barcode,
};
use kvs_frames::error::ErrorKind;
use kvs_frames::kvs::{
    ClipExtractor, ClipOptions, ClipPlanning, ClipRequest, Discovery, DiscoveryOptions, KvsClient,
    Shard, StreamStatus as KvsStatus, TimestampSelector,
};
use kvs_frames::retention;
use kvs_frames::{PixelFormat, UriFrameSource};

fn api_calls(emulator: &Emulator, operation: &str) -> u64 {
    emulator
        .request_stats()
        .api_calls
        .get(operation)
        .copied()
        .unwrap_or(0)
}

fn errors(emulator: &Emulator, code: &str) -> u64 {
    emulator
        .request_stats()
        .errors
        .get(code)
        .copied()
        .unwrap_or(0)
}

/// A client whose SDK does not retry by itself, so that only the crate's retries are seen.
fn client_without_sdk_retries(emulator: &Emulator) -> KvsClient {
    let config = emulator
        .sdk_config()
        .to_builder()
        .retry_config(aws_config::retry::RetryConfig::disabled())
        .build();
    KvsClient::new(&config)
}

/// Retries fast enough for tests.
fn fast() -> ClipOptions {
    ClipOptions::default()
        .max_attempts(10)
        .backoff(Duration::from_millis(50), Duration::from_millis(400))
}

fn expected_frames(records: &[FragmentRecord]) -> Vec<u32> {
    records
        .iter()
        .flat_map(|r| (r.first_frame..r.first_frame + u64::from(r.frame_count)).map(|n| n as u32))
        .collect()
}

fn decoded_frames(data: Vec<u8>) -> Vec<u32> {
    common::decode_mp4(&data)
        .iter()
        .map(|f| f.frame_number.expect("every frame has a readable barcode"))
        .collect()
}

/// Decodes a JPEG and reads its barcode.
fn jpeg_frame_number(jpeg: &[u8]) -> Option<u32> {
    gst::init().unwrap();
    let pipeline = gst::parse::launch(
        "appsrc name=src ! jpegdec ! videoconvert ! video/x-raw,format=GRAY8 ! appsink name=sink sync=false",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline
        .by_name("src")
        .unwrap()
        .downcast::<gst_app::AppSrc>()
        .unwrap();
    let sink = pipeline
        .by_name("sink")
        .unwrap()
        .downcast::<gst_app::AppSink>()
        .unwrap();
    src.set_caps(Some(&gst::Caps::builder("image/jpeg").build()));
    pipeline.set_state(gst::State::Playing).unwrap();
    src.push_buffer(gst::Buffer::from_slice(jpeg.to_vec()))
        .unwrap();
    src.end_of_stream().unwrap();
    let sample = sink.try_pull_sample(gst::ClockTime::from_seconds(20))?;
    let info = gstreamer_video::VideoInfo::from_caps(sample.caps()?).ok()?;
    let map = sample.buffer()?.map_readable().ok()?;
    let number = barcode::read_gray8(
        map.as_slice(),
        info.stride()[0] as usize,
        info.width() as usize,
        info.height() as usize,
    );
    drop(map);
    pipeline.set_state(gst::State::Null).unwrap();
    number
}

fn dir_entries(dir: &Path) -> BTreeSet<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

fn no_camera(name: &str) -> StreamSpec {
    StreamSpec::new(name).camera(false)
}

/// Services spawn these on multi-threaded runtimes: the futures must be `Send`.
#[allow(dead_code)]
fn futures_are_send(discovery: &Discovery, clips: &ClipExtractor, request: &ClipRequest) {
    fn send<T: Send>(_: T) {}
    send(discovery.active_streams());
    send(discovery.refresh());
    send(discovery.describe("cam-1"));
    send(discovery.list_streams());
    send(clips.extract_to_file(request, "x.mp4"));
    send(clips.extract_to_bytes(request));
    send(clips.fragments(request));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_reads_every_page_keeps_active_streams_and_caches_them() {
    let emulator = Emulator::builder()
        .list_streams_page_limit(2)
        .stream(no_camera("cam-1"))
        .stream(no_camera("cam-2"))
        .stream(no_camera("cam-3"))
        .stream(no_camera("cam-4"))
        .stream(no_camera("cam-5").status(StreamStatus::Creating))
        .stream(no_camera("lobby-1"))
        .start()
        .unwrap();
    let client = client_without_sdk_retries(&emulator);
    let cached = Discovery::new(
        client.clone(),
        DiscoveryOptions::default()
            .name_prefix("cam-")
            .page_size(2)
            .ttl(Duration::from_secs(3600)),
    )
    .unwrap();

    // Five cam-* streams in pages of two: three ListStreams calls; CREATING is left out.
    let active = cached.active_streams().await.unwrap();
    assert_eq!(
        active.names().collect::<Vec<_>>(),
        ["cam-1", "cam-2", "cam-3", "cam-4"]
    );
    assert!(!active.from_cache() && !active.is_stale());
    assert_eq!(api_calls(&emulator, "ListStreams"), 3);
    assert!(active.iter().all(|s| s.status == KvsStatus::Active));
    assert!(active[0].arn.starts_with("arn:aws:kinesisvideo:"));
    assert_eq!(active[0].media_type.as_deref(), Some("video/h264"));
    assert_eq!(active[0].data_retention_hours, Some(24));

    let all = cached.list_streams().await.unwrap();
    assert_eq!(all.len(), 5);
    assert_eq!(all[4].status, KvsStatus::Creating);

    // Within the TTL: served from the cache, even though a stream was added meanwhile.
    let before = api_calls(&emulator, "ListStreams");
    emulator.add_stream(no_camera("cam-6")).unwrap();
    let again = cached.active_streams().await.unwrap();
    assert!(again.from_cache());
    assert_eq!(again.len(), 4);
    assert_eq!(api_calls(&emulator, "ListStreams"), before);
    // After invalidation, read again.
    cached.invalidate();
    assert_eq!(cached.active_streams().await.unwrap().len(), 5);

    // After the TTL: refreshed.
    let short = Discovery::new(
        client.clone(),
        DiscoveryOptions::default().ttl(Duration::from_millis(200)),
    )
    .unwrap();
    let first = short.active_streams().await.unwrap();
    assert_eq!(first.len(), 6, "no prefix: lobby-1 too");
    emulator.add_stream(no_camera("cam-7")).unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let refreshed = short.active_streams().await.unwrap();
    assert!(!refreshed.from_cache());
    assert_eq!(refreshed.len(), 7);

    // DescribeStream.
    let details = cached.describe("cam-5").await.unwrap();
    assert_eq!(details.status, KvsStatus::Creating);
    assert_eq!(details.name, "cam-5");
    let by_arn = cached.describe(details.arn.as_str()).await.unwrap();
    assert_eq!(by_arn.name, "cam-5");
    let err = cached.describe("nope").await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamNotFound);
    assert!(err.to_string().contains("nope"), "{err}");

    // A failed refresh is an error, unless stale data was asked for (and it says so).
    let options = DiscoveryOptions::default()
        .ttl(Duration::from_millis(100))
        .max_attempts(2)
        .backoff(Duration::from_millis(10), Duration::from_millis(20));
    let strict = Discovery::new(client.clone(), options.clone()).unwrap();
    let lenient = Discovery::new(client.clone(), options.stale_on_error(true)).unwrap();
    strict.active_streams().await.unwrap();
    lenient.active_streams().await.unwrap();
    emulator.shutdown();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let err = strict.active_streams().await.unwrap_err();
    assert!(err.is_transient(), "{err:?}");
    let stale = lenient.active_streams().await.unwrap();
    assert!(stale.is_stale());
    assert_eq!(stale.len(), 7);
    assert!(stale.refresh_error().is_some_and(|e| e.is_transient()));
}

/// Four replicas over 40 streams listed in pages: each sees only its own, together they see every
/// ACTIVE stream exactly once, and a fifth replica takes streams only from the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sharded_discovery_gives_every_active_stream_to_exactly_one_replica() {
    let mut builder = Emulator::builder().list_streams_page_limit(7);
    for i in 0..40 {
        let spec = no_camera(&format!("cam-{i:02}"));
        builder = builder.stream(if i == 39 {
            spec.status(StreamStatus::Creating)
        } else {
            spec
        });
    }
    let emulator = builder.start().unwrap();
    let client = client_without_sdk_retries(&emulator);
    let owned = |count: u32| {
        let client = client.clone();
        async move {
            let mut per_replica = Vec::new();
            for index in 0..count {
                let shard = Shard::new(index, count).unwrap();
                let discovery =
                    Discovery::new(client.clone(), DiscoveryOptions::default().shard(shard))
                        .unwrap();
                let names: BTreeSet<String> = discovery
                    .active_streams()
                    .await
                    .unwrap()
                    .names()
                    .map(str::to_owned)
                    .collect();
                assert!(names.iter().all(|n| shard.owns(n)), "{shard}: {names:?}");
                per_replica.push(names);
            }
            per_replica
        }
    };
    let four = owned(4).await;
    let mut union = BTreeSet::new();
    for names in &four {
        assert!(!names.is_empty(), "every replica gets some of 39: {four:?}");
        for name in names {
            assert!(
                union.insert(name.clone()),
                "{name} has two owners: {four:?}"
            );
        }
    }
    let expected: BTreeSet<String> = (0..39).map(|i| format!("cam-{i:02}")).collect();
    assert_eq!(union, expected, "exactly the ACTIVE streams, once each");

    // A fifth replica: what it owns comes from the four, nothing else moves.
    let five = owned(5).await;
    for (index, names) in five.iter().take(4).enumerate() {
        assert!(
            names.is_subset(&four[index]),
            "replica {index} gained streams when a replica was added: {:?} -> {names:?}",
            four[index]
        );
    }
    let moved: usize = four.iter().zip(&five).map(|(a, b)| a.len() - b.len()).sum();
    assert_eq!(moved, five[4].len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_fragments_pages_come_unordered_and_match_the_ground_truth() {
    let emulator = common::start(vec![
        small("cam-1")
            .fps(10)
            .fragment_duration(Duration::from_millis(500))
            .history(Duration::from_secs(10)),
    ]);
    common::wait_fragments(&emulator, "cam-1", 20, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("cam-1");
    let media = common::media(&emulator, "cam-1").await;
    let selector = |start: SystemTime, end: SystemTime| {
        FragmentSelector::builder()
            .fragment_selector_type(FragmentSelectorType::ProducerTimestamp)
            .timestamp_range(
                TimestampRange::builder()
                    .start_timestamp(dt(start))
                    .end_timestamp(dt(end))
                    .build()
                    .unwrap(),
            )
            .build()
            .unwrap()
    };
    // Fragments 3..=17, both ends inclusive, in pages of 4.
    let mut token: Option<String> = None;
    let mut listed = Vec::new();
    let mut pages = 0;
    loop {
        let mut call = media.list_fragments().stream_name("cam-1").max_results(4);
        call = match token.take() {
            Some(t) => call.next_token(t),
            None => {
                call.fragment_selector(selector(truth[3].producer_start, truth[17].producer_start))
            }
        };
        let out = call.send().await.unwrap();
        pages += 1;
        let page: Vec<_> = out.fragments().to_vec();
        if page.len() > 1 {
            assert!(
                page[0].producer_timestamp() > page[1].producer_timestamp(),
                "the emulator lists a page newest first"
            );
        }
        listed.extend(page);
        match out.next_token() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
    }
    assert_eq!(pages, 4);
    listed.sort_by_key(|f| *f.producer_timestamp().unwrap());
    assert_eq!(listed.len(), 15);
    for (f, r) in listed.iter().zip(&truth[3..=17]) {
        assert_eq!(f.fragment_number(), Some(r.fragment_number.as_str()));
        assert_eq!(f.fragment_size_in_bytes(), r.size as i64);
        assert_eq!(f.fragment_length_in_milliseconds(), 500);
        // Epoch seconds as JSON numbers: equal at KVS's millisecond precision.
        let ms = |t: &aws_smithy_types::DateTime| (t.as_secs_f64() * 1000.0).round() as i64;
        assert_eq!(
            ms(f.producer_timestamp().unwrap()),
            ms(&dt(r.producer_start))
        );
        assert_eq!(ms(f.server_timestamp().unwrap()), ms(&dt(r.server_start)));
    }

    // Errors as the other handlers give them.
    let bad_token = media
        .list_fragments()
        .stream_name("cam-1")
        .next_token("Zm9v")
        .send()
        .await
        .unwrap_err();
    let err = kvs_frames::Error::from_sdk("ListFragments", bad_token);
    assert_eq!(err.kind(), ErrorKind::InvalidArgument);
    let no_selector = media
        .list_fragments()
        .stream_name("cam-1")
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        kvs_frames::Error::from_sdk("ListFragments", no_selector).kind(),
        ErrorKind::InvalidArgument
    );
    let unknown = media
        .list_fragments()
        .stream_name("nope")
        .fragment_selector(selector(truth[0].producer_start, truth[1].producer_start))
        .send()
        .await
        .unwrap_err();
    assert_eq!(
        kvs_frames::Error::from_sdk("ListFragments", unknown).kind(),
        ErrorKind::StreamNotFound
    );
    // An empty range is an empty list.
    let future = SystemTime::now() + Duration::from_secs(3600);
    let out = media
        .list_fragments()
        .stream_name("cam-1")
        .fragment_selector(selector(future, future + Duration::from_secs(60)))
        .send()
        .await
        .unwrap();
    assert!(out.fragments().is_empty() && out.next_token().is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_60_second_clip_decodes_to_exactly_the_ground_truth_frames() {
    let emulator = common::start(vec![
        small("cam-1").fps(10).history(Duration::from_secs(70)),
    ]);
    common::wait_fragments(&emulator, "cam-1", 66, Duration::from_secs(60)).await;
    let truth = emulator.ground_truth("cam-1");
    let clips = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let dir = tempdir("clip60");
    let path = dir.join("live/cam-1/clip.mp4");

    // Starts half-way into fragment 2: fragment 2 is included. Ends 60 s later: fragments
    // starting up to then are included (2..=62).
    let start = truth[2].producer_start + Duration::from_millis(500);
    let request = ClipRequest::new("cam-1", start, start + Duration::from_secs(60)).thumbnail(true);
    let info = clips.extract_to_file(&request, &path).await.unwrap();
    let expected = expected_frames(&truth[2..=62]);
    assert_eq!(info.fragments, 61);
    assert_eq!(info.get_clip_calls, 1);
    assert_eq!(info.frames, expected.len() as u64);
    assert_eq!(info.media_duration, Duration::from_secs(61));
    assert_eq!(info.first_fragment_start, truth[2].producer_start);
    assert_eq!(
        info.last_fragment_end,
        truth[62].producer_start + truth[62].duration
    );
    assert_eq!(info.first_fragment_number, truth[2].fragment_number);
    assert_eq!(info.path.as_deref(), Some(path.as_path()));
    let bytes = std::fs::read(&path).unwrap();
    assert_eq!(info.size_bytes, bytes.len() as u64);
    assert_eq!(&bytes[4..8], b"ftyp");
    let frames = tokio::task::spawn_blocking(move || decoded_frames(bytes))
        .await
        .unwrap();
    assert_eq!(frames, expected);

    // The thumbnail is the clip's first frame, and nothing else is left in the directory.
    let thumbnail = info.thumbnail_path.clone().expect("thumbnail written");
    assert_eq!(thumbnail, dir.join("live/cam-1/clip.jpg"));
    let jpeg = std::fs::read(&thumbnail).unwrap();
    assert_eq!(&jpeg[..2], &[0xff, 0xd8]);
    assert_eq!(jpeg_frame_number(&jpeg), Some(expected[0]));
    assert_eq!(
        dir_entries(&dir.join("live/cam-1")),
        BTreeSet::from(["clip.jpg".to_owned(), "clip.mp4".to_owned()])
    );

    // The same clip in memory, by server timestamps this time (300 ms later than producer).
    let server_start = truth[2].server_start + Duration::from_millis(500);
    let in_memory = clips
        .extract_to_bytes(
            &ClipRequest::new(
                "cam-1",
                server_start,
                server_start + Duration::from_secs(60),
            )
            .selector(TimestampSelector::Server)
            .thumbnail(true),
        )
        .await
        .unwrap();
    assert_eq!(in_memory.info.fragments, 61);
    assert!(in_memory.thumbnail_jpeg.is_some());
    let frames = tokio::task::spawn_blocking(move || decoded_frames(in_memory.mp4))
        .await
        .unwrap();
    assert_eq!(frames, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h265_clips_and_thumbnails_hold_exactly_the_ground_truth_frames() {
    let emulator = common::start(vec![
        small("hevc")
            .fps(10)
            .codec(VideoCodec::H265)
            .history(Duration::from_secs(12)),
    ]);
    common::wait_fragments(&emulator, "hevc", 12, Duration::from_secs(60)).await;
    let truth = emulator.ground_truth("hevc");
    let clips = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let request = ClipRequest::new(
        "hevc",
        truth[2].producer_start + Duration::from_millis(500),
        truth[8].producer_start,
    )
    .thumbnail(true);
    let expected = expected_frames(&truth[2..=8]);
    // Split into calls of 3 fragments: the joins of H.265 parts too.
    for clips in [
        clips,
        ClipExtractor::new(
            KvsClient::new(&emulator.sdk_config()),
            fast().max_fragments_per_call(3),
        )
        .unwrap(),
    ] {
        let clip = clips.extract_to_bytes(&request).await.unwrap();
        assert_eq!(clip.info.fragments, 7);
        let jpeg = clip.thumbnail_jpeg.clone().expect("an H.265 thumbnail");
        assert_eq!(jpeg_frame_number(&jpeg), Some(expected[0]));
        let mp4 = clip.mp4;
        assert!(
            mp4.windows(4).any(|w| w == b"hvcC"),
            "the clip keeps the HEVC configuration"
        );
        // The clip as a file, read by UriFrameSource: the same frames.
        let file = mp4.clone();
        let from_file = tokio::task::spawn_blocking(move || read_back("hevc-file", &file))
            .await
            .unwrap();
        assert_eq!(from_file, expected);
        let frames = tokio::task::spawn_blocking(move || decoded_frames(mp4))
            .await
            .unwrap();
        assert_eq!(frames, expected);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clips_of_b_frame_streams_hold_every_frame_once_in_order() {
    for offsets in [CompositionOffsets::Positive, CompositionOffsets::Negative] {
        let name = format!("bframes-{offsets:?}").to_lowercase();
        let emulator = common::start(vec![
            small(&name)
                .fps(10)
                .b_frames(2, offsets)
                .history(Duration::from_secs(10)),
        ]);
        common::wait_fragments(&emulator, &name, 10, Duration::from_secs(60)).await;
        let truth = emulator.ground_truth(&name);
        let request = ClipRequest::new(
            name.as_str(),
            truth[1].producer_start,
            truth[7].producer_start,
        )
        .thumbnail(true);
        let expected = expected_frames(&truth[1..=7]);
        // Whole, and joined from calls of 2 fragments.
        for per_call in [200, 2] {
            let clips = ClipExtractor::new(
                KvsClient::new(&emulator.sdk_config()),
                fast().max_fragments_per_call(per_call),
            )
            .unwrap();
            let clip = clips.extract_to_bytes(&request).await.unwrap();
            assert_eq!(
                jpeg_frame_number(&clip.thumbnail_jpeg.clone().unwrap()),
                Some(expected[0]),
                "{offsets:?}"
            );
            assert_eq!(clip.info.frames, expected.len() as u64);
            let frames = tokio::task::spawn_blocking(move || decoded_frames(clip.mp4))
                .await
                .unwrap();
            assert_eq!(
                frames, expected,
                "{offsets:?}, {per_call} fragments per call"
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_ranges_are_split_and_joined_without_gap_or_repeat() {
    // 100 ms fragments of 2 frames: 460 fragments at once.
    let emulator = common::start(vec![
        small("short")
            .fps(20)
            .fragment_duration(Duration::from_millis(100))
            .history(Duration::from_secs(46)),
    ]);
    common::wait_fragments(&emulator, "short", 456, Duration::from_secs(60)).await;
    let truth = emulator.ground_truth("short");
    let client = KvsClient::new(&emulator.sdk_config());

    // 450 fragments: GetClip calls of 200, 200 and 50; ListFragments pages of 100 over
    // [start − 20 s, end] (455 fragments: 5 pages).
    let clips = ClipExtractor::new(client.clone(), fast().list_page_size(100)).unwrap();
    let request = ClipRequest::new("short", truth[5].producer_start, truth[454].producer_start);
    let calls_before = api_calls(&emulator, "GetClip");
    let lists_before = api_calls(&emulator, "ListFragments");
    let clip = clips.extract_to_bytes(&request).await.unwrap();
    assert_eq!(clip.info.fragments, 450);
    assert_eq!(clip.info.get_clip_calls, 3);
    assert_eq!(api_calls(&emulator, "GetClip") - calls_before, 3);
    assert_eq!(api_calls(&emulator, "ListFragments") - lists_before, 5);
    let expected = expected_frames(&truth[5..=454]);
    assert_eq!(clip.info.frames, expected.len() as u64);
    assert_eq!(clip.info.media_duration, Duration::from_secs(45));
    let frames = tokio::task::spawn_blocking(move || decoded_frames(clip.mp4))
        .await
        .unwrap();
    assert_eq!(frames.len(), expected.len());
    assert_eq!(
        frames, expected,
        "no frame missing or repeated at the joins"
    );

    // Split by size: at most a fifth of the bytes per call.
    let range = &truth[100..250];
    let total: u64 = range.iter().map(|r| r.size as u64).sum();
    let max_bytes = total / 5;
    let mut expected_calls = 0;
    let mut acc = 0u64;
    let mut n = 0;
    for r in range {
        if n > 0 && acc + r.size as u64 > max_bytes {
            expected_calls += 1;
            acc = 0;
            n = 0;
        }
        acc += r.size as u64;
        n += 1;
    }
    expected_calls += 1;
    let clips = ClipExtractor::new(client, fast().max_bytes_per_call(max_bytes)).unwrap();
    let clip = clips
        .extract_to_bytes(&ClipRequest::new(
            "short",
            range[0].producer_start,
            range[range.len() - 1].producer_start,
        ))
        .await
        .unwrap();
    assert!(expected_calls >= 5, "{expected_calls}");
    assert_eq!(clip.info.get_clip_calls, expected_calls);
    let frames = tokio::task::spawn_blocking(move || decoded_frames(clip.mp4))
        .await
        .unwrap();
    assert_eq!(frames, expected_frames(range));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_back_windows_hold_every_fragment_exactly_once() {
    // The live-to-batch recipe (examples/clip_worker.rs): windows [t, t+N), [t+N, t+2N), …
    // not aligned with the fragments, without the fragment running at the window start.
    let emulator = common::start(vec![
        small("cam-1").fps(10).history(Duration::from_secs(20)),
    ]);
    common::wait_fragments(&emulator, "cam-1", 20, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("cam-1");
    let clips = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let t0 = truth[2].producer_start + Duration::from_millis(300);
    let window = Duration::from_secs(5);
    let mut frames = Vec::new();
    for i in 0..3 {
        let start = t0 + window * i;
        let request = ClipRequest::new("cam-1", start, start + window - Duration::from_millis(1))
            .include_fragment_at_start(false);
        let clip = clips.extract_to_bytes(&request).await.unwrap();
        assert_eq!(clip.info.fragments, 5);
        frames.extend(
            tokio::task::spawn_blocking(move || decoded_frames(clip.mp4))
                .await
                .unwrap(),
        );
    }
    // Fragments 3..=17: those starting in [t0, t0 + 15 s).
    assert_eq!(frames, expected_frames(&truth[3..=17]));
}

/// The GetClip calls `clips` made for `request` and the frames of its clip.
async fn clip_frames(
    clips: &ClipExtractor,
    request: &ClipRequest,
) -> (kvs_frames::kvs::ClipInfo, Vec<u32>) {
    let clip = clips.extract_to_bytes(request).await.unwrap();
    let frames = tokio::task::spawn_blocking(move || decoded_frames(clip.mp4))
        .await
        .unwrap();
    (clip.info, frames)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_list_fragments_get_clip_alone_writes_the_same_clips() {
    // An IAM policy with GetClip but not ListFragments: the same frames, short and long ranges.
    let emulator = common::start(vec![
        small("cam-1").fps(10).history(Duration::from_secs(70)),
        small("short")
            .fps(20)
            .fragment_duration(Duration::from_millis(100))
            .history(Duration::from_secs(46)),
    ]);
    common::wait_fragments(&emulator, "cam-1", 66, Duration::from_secs(60)).await;
    common::wait_fragments(&emulator, "short", 456, Duration::from_secs(60)).await;
    let cam = emulator.ground_truth("cam-1");
    let short = emulator.ground_truth("short");
    let ms = Duration::from_millis;
    let requests = [
        // Starts inside fragment 2, which is included: 2..=62.
        (
            ClipRequest::new(
                "cam-1",
                cam[2].producer_start + ms(500),
                cam[2].producer_start + ms(60_500),
            ),
            expected_frames(&cam[2..=62]),
        ),
        // Starts exactly on fragment 5: fragment 4 ends there and is not included.
        (
            ClipRequest::new("cam-1", cam[5].producer_start, cam[15].producer_start),
            expected_frames(&cam[5..=15]),
        ),
        // 450 fragments: more than GetClip returns at once (200).
        (
            ClipRequest::new("short", short[5].producer_start, short[454].producer_start),
            expected_frames(&short[5..=454]),
        ),
        // Not aligned with the fragments, without the one running at the start: 6..=300.
        (
            ClipRequest::new(
                "short",
                short[5].producer_start + ms(30),
                short[300].producer_start + ms(30),
            )
            .include_fragment_at_start(false),
            expected_frames(&short[6..=300]),
        ),
        // The clip_worker recipe: back-to-back windows [t, t + 5 s).
        (
            ClipRequest::new(
                "cam-1",
                cam[20].producer_start + ms(300),
                cam[20].producer_start + ms(5299),
            )
            .include_fragment_at_start(false),
            expected_frames(&cam[21..=25]),
        ),
    ];
    let listed = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let mut reference = Vec::new();
    for (request, expected) in &requests {
        let (info, frames) = clip_frames(&listed, request).await;
        assert_eq!(info.planning, ClipPlanning::ListFragments);
        assert_eq!(&frames, expected, "{request:?}");
        reference.push((info, frames));
    }

    // ListFragments refused as IAM refuses it (403 AccessDeniedException).
    emulator
        .refuse_api("ListFragments", Some(Refusal::AccessDenied))
        .unwrap();
    let client = KvsClient::new(&emulator.sdk_config());
    let by_time = ClipExtractor::new(client.clone(), fast()).unwrap();
    let lists_before = api_calls(&emulator, "ListFragments");
    let calls_before = api_calls(&emulator, "GetClip");
    let mut calls = Vec::new();
    for ((request, _), (listed_info, listed_frames)) in requests.iter().zip(&reference) {
        let (info, frames) = clip_frames(&by_time, request).await;
        assert_eq!(info.planning, ClipPlanning::GetClipOnly);
        assert_eq!(frames.len(), listed_frames.len(), "{request:?}");
        assert_eq!(
            &frames, listed_frames,
            "no frame missing or repeated: {request:?}"
        );
        assert_eq!(info.frames, listed_info.frames);
        assert_eq!(
            info.fragments, listed_info.fragments,
            "one key frame per fragment"
        );
        assert_eq!(info.media_duration, listed_info.media_duration);
        calls.push(info.get_clip_calls);
    }
    // Asked once, remembered by the client.
    assert_eq!(api_calls(&emulator, "ListFragments") - lists_before, 1);
    assert_eq!(
        client.list_fragments_refused(),
        Some(ErrorKind::NotAuthorized)
    );
    assert_eq!(
        api_calls(&emulator, "GetClip") - calls_before,
        calls.iter().sum::<usize>() as u64
    );
    // Two small calls find the fragment at the start (the second only returns it if it still
    // runs at the start), then one per window, and one more per 200 fragments.
    assert_eq!(calls, [3, 3, 5, 2, 1]);

    // An endpoint that does not know ListFragments (404 UnknownOperationException): the same
    // again; the error says what happened (not "stream not found").
    emulator
        .refuse_api("ListFragments", Some(Refusal::UnknownOperation))
        .unwrap();
    let client = KvsClient::new(&emulator.sdk_config());
    let strict =
        ClipExtractor::new(client.clone(), fast().planning(ClipPlanning::ListFragments)).unwrap();
    let err = strict.fragments(&requests[0].0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedOperation, "{err}");
    assert_eq!(err.aws_error_code(), Some("UnknownOperationException"));
    let err = strict.extract_to_bytes(&requests[0].0).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedOperation, "{err}");
    let auto = ClipExtractor::new(client.clone(), fast()).unwrap();
    let (info, frames) = clip_frames(&auto, &requests[2].0).await;
    assert_eq!(info.planning, ClipPlanning::GetClipOnly);
    assert_eq!(frames, reference[2].1);
    assert_eq!(
        client.list_fragments_refused(),
        Some(ErrorKind::UnsupportedOperation)
    );
    assert!(errors(&emulator, "UnknownOperationException") >= 2);

    // GetClip alone on purpose, with ListFragments allowed again: not called at all.
    emulator.refuse_api("ListFragments", None).unwrap();
    let lists_before = api_calls(&emulator, "ListFragments");
    let only = ClipExtractor::new(
        KvsClient::new(&emulator.sdk_config()),
        fast().planning(ClipPlanning::GetClipOnly),
    )
    .unwrap();
    let (_, frames) = clip_frames(&only, &requests[3].0).await;
    assert_eq!(frames, reference[3].1);
    assert_eq!(api_calls(&emulator, "ListFragments"), lists_before);
    // Unknown operation names are refused by the emulator.
    assert!(
        emulator
            .refuse_api("ListFragment", Some(Refusal::AccessDenied))
            .is_err()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_clip_alone_skips_what_a_continuation_repeats_after_a_gap() {
    // A range that starts in a gap (the camera was offline): the first fragment starts well
    // after the range, so the lower bound of where the next call may start lies before the end
    // of the previous part, and the next response repeats its last fragments. Responses of 10
    // or more key frames count as possibly cut short here, so that every response is followed
    // by a continuation.
    let emulator = common::start(vec![
        small("gap")
            .fps(20)
            .fragment_duration(Duration::from_millis(100))
            .history(Duration::from_secs(2)),
    ]);
    emulator
        .faults("gap")
        .unwrap()
        .camera_offline(Duration::from_millis(1500));
    let gap_at = loop {
        let truth = emulator.ground_truth("gap");
        if let Some(i) = (1..truth.len()).find(|&i| {
            truth[i].producer_start
                > truth[i - 1].producer_start + truth[i - 1].duration + Duration::from_millis(800)
        }) && truth.len() >= i + 45
        {
            break i;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let truth = emulator.ground_truth("gap");
    let before = &truth[gap_at - 1];
    let start = before.producer_start + before.duration + Duration::from_millis(200);
    let end = truth[gap_at + 40].producer_start;
    let request = ClipRequest::new("gap", start, end).include_fragment_at_start(false);
    let expected = expected_frames(&truth[gap_at..=gap_at + 40]);

    let listed = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let (_, frames) = clip_frames(&listed, &request).await;
    assert_eq!(frames, expected);
    let by_time = ClipExtractor::new(
        KvsClient::new(&emulator.sdk_config()),
        fast()
            .planning(ClipPlanning::GetClipOnly)
            .max_fragments_per_call(10),
    )
    .unwrap();
    let (info, frames) = clip_frames(&by_time, &request).await;
    assert_eq!(frames.len(), expected.len());
    assert_eq!(frames, expected, "repeats skipped, nothing missing");
    assert_eq!(info.fragments, 41);
    // The range, then its continuation: only repeats, all skipped.
    assert_eq!(info.get_clip_calls, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn empty_ranges_unknown_and_inactive_streams_are_typed_errors() {
    let emulator = common::start(vec![
        small("cam-1").fps(10).history(Duration::from_secs(3)),
        small("cam-new")
            .status(StreamStatus::Creating)
            .camera(false),
    ]);
    common::wait_fragments(&emulator, "cam-1", 3, Duration::from_secs(30)).await;
    let client = KvsClient::new(&emulator.sdk_config());
    let clips = ClipExtractor::new(client.clone(), fast()).unwrap();
    let dir = tempdir("errors");
    let path = dir.0.join("clip.mp4");
    let now = SystemTime::now();

    let future = ClipRequest::new(
        "cam-1",
        now + Duration::from_secs(3600),
        now + Duration::from_secs(3660),
    );
    let err = clips.extract_to_file(&future, &path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::NoFragments, "{err}");
    let past = ClipRequest::new(
        "cam-1",
        now - Duration::from_secs(7200),
        now - Duration::from_secs(3600),
    );
    assert_eq!(
        clips.extract_to_bytes(&past).await.unwrap_err().kind(),
        ErrorKind::NoFragments
    );

    let unknown = ClipRequest::new("nope", now - Duration::from_secs(10), now);
    let err = clips.extract_to_file(&unknown, &path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{err}");
    assert!(err.to_string().contains("nope"), "{err}");

    let creating = ClipRequest::new("cam-new", now - Duration::from_secs(10), now);
    let err = clips.extract_to_file(&creating, &path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{err}");
    assert!(err.to_string().contains("CREATING"), "{err}");
    // Without the status check, KVS (here the emulator) refuses it the same way.
    let unchecked = ClipExtractor::new(client, fast().check_stream_status(false)).unwrap();
    let err = unchecked
        .extract_to_file(&creating, &path)
        .await
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::StreamNotFound, "{err}");

    let backwards = ClipRequest::new("cam-1", now, now - Duration::from_secs(1));
    let err = clips.extract_to_file(&backwards, &path).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);

    assert!(dir_entries(&dir).is_empty(), "{:?}", dir_entries(&dir));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_clip_leaves_no_file_under_its_name() {
    let emulator = common::start(vec![
        small("cam-1")
            .fps(10)
            .fragment_duration(Duration::from_millis(500))
            .history(Duration::from_secs(5)),
    ]);
    common::wait_fragments(&emulator, "cam-1", 10, Duration::from_secs(30)).await;
    // Injected failure: the codec configuration changes inside the range. GetClip stops at the
    // change (one configuration per MP4), the extractor asks for the rest, and the join refuses
    // the second configuration, after the first part was written.
    emulator
        .faults("cam-1")
        .unwrap()
        .change_resolution(160, 120);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let truth = loop {
        let truth = emulator.ground_truth("cam-1");
        if truth.iter().filter(|r| r.width == 160).count() >= 3 {
            break truth;
        }
        assert!(std::time::Instant::now() < deadline, "no resolution change");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let clips = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    let dir = tempdir("atomic");
    let request = ClipRequest::new(
        "cam-1",
        truth[0].producer_start,
        truth[truth.len() - 1].producer_start,
    )
    .thumbnail(true);
    let calls_before = api_calls(&emulator, "GetClip");
    let fresh = dir.join("fresh.mp4");
    let err = clips.extract_to_file(&request, &fresh).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::UnsupportedMedia, "{err}");
    assert_eq!(api_calls(&emulator, "GetClip") - calls_before, 2);
    assert!(!fresh.exists());

    // An older clip under the same name stays as it was.
    let existing = dir.join("existing.mp4");
    std::fs::write(&existing, b"the previous clip").unwrap();
    clips
        .extract_to_file(&request, &existing)
        .await
        .unwrap_err();
    assert_eq!(std::fs::read(&existing).unwrap(), b"the previous clip");
    assert_eq!(
        dir_entries(&dir),
        BTreeSet::from(["existing.mp4".to_owned()]),
        "no part, temporary or thumbnail file left"
    );

    // Before the change, the same stream extracts fine.
    let first_small = truth.iter().position(|r| r.width == 160).unwrap();
    let ok = clips
        .extract_to_bytes(&ClipRequest::new(
            "cam-1",
            truth[0].producer_start,
            truth[first_small - 1].producer_start,
        ))
        .await
        .unwrap();
    assert_eq!(ok.info.fragments, first_small);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttling_and_endpoint_failures_are_retried() {
    let emulator = common::start(vec![small("cam-1").fps(10).history(Duration::from_secs(4))]);
    common::wait_fragments(&emulator, "cam-1", 4, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("cam-1");
    let request = ClipRequest::new("cam-1", truth[0].producer_start, truth[3].producer_start);
    let faults = emulator.faults("cam-1").unwrap();

    // Throttled ListFragments: retried with backoff; the endpoints stay cached (throttling
    // says nothing about them): one GetDataEndpoint per API.
    let clips = ClipExtractor::new(KvsClient::new(&emulator.sdk_config()), fast()).unwrap();
    faults.throttle(Duration::from_millis(600));
    let clip = clips.extract_to_bytes(&request).await.unwrap();
    assert_eq!(clip.info.fragments, 4);
    assert!(
        errors(&emulator, "ClientLimitExceededException") >= 1,
        "{:?}",
        emulator.request_stats()
    );
    assert!(api_calls(&emulator, "ListFragments") >= 2);
    assert_eq!(api_calls(&emulator, "GetDataEndpoint"), 2);

    // HTTP 500 through the data endpoint: retried, and the endpoint is reloaded.
    let clips = ClipExtractor::new(client_without_sdk_retries(&emulator), fast()).unwrap();
    let endpoints_before = api_calls(&emulator, "GetDataEndpoint");
    faults.server_errors(Duration::from_millis(800));
    let clip = clips.extract_to_bytes(&request).await.unwrap();
    assert_eq!(clip.info.fragments, 4);
    assert!(errors(&emulator, "InternalFailure") >= 1);
    assert!(
        api_calls(&emulator, "GetDataEndpoint") - endpoints_before >= 3,
        "LIST_FRAGMENTS reloaded after the failure, plus GET_CLIP"
    );

    // With a single attempt, throttling is an error of its own kind.
    let once = ClipExtractor::new(
        KvsClient::new(&emulator.sdk_config()),
        fast().max_attempts(1),
    )
    .unwrap();
    faults.throttle(Duration::from_secs(30));
    let err = once.extract_to_bytes(&request).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Throttled, "{err}");
    faults.clear();
}

#[test]
fn retention_dry_run_deletes_nothing_then_the_sweep_deletes_old_clips() {
    let dir = tempdir("retention");
    let old = SystemTime::now() - Duration::from_secs(2 * 3600);
    let file = |rel: &str, bytes: usize, modified: Option<SystemTime>| -> PathBuf {
        let path = dir.join(rel);
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(&path, vec![7u8; bytes]).unwrap();
        if let Some(t) = modified {
            std::fs::File::options()
                .write(true)
                .open(&path)
                .unwrap()
                .set_modified(t)
                .unwrap();
        }
        path
    };
    let old_clip = file("live/cam-1/a.mp4", 1000, Some(old));
    let old_thumb = file("live/cam-1/a.jpg", 100, Some(old));
    let old_clip2 = file("live/cam-2/b.MP4", 500, Some(old));
    let new_clip = file("live/cam-1/c.mp4", 10, None);
    let notes = file("live/notes.txt", 10, Some(old));
    let hidden = file("live/cam-1/.d.mp4", 10, Some(old));
    let stale_work = dir.join("live/cam-1/.e.mp4.0123456789abcdef.kvs-clip-tmp");
    file(
        "live/cam-1/.e.mp4.0123456789abcdef.kvs-clip-tmp/part-00000.mp4",
        10,
        Some(old),
    );
    std::fs::File::open(&stale_work)
        .unwrap()
        .set_modified(old)
        .unwrap();
    let fresh_work = dir.join("live/cam-1/.f.mp4.fedcba9876543210.kvs-clip-tmp");
    file(
        "live/cam-1/.f.mp4.fedcba9876543210.kvs-clip-tmp/clip.mp4",
        10,
        Some(old),
    );

    let max_age = Duration::from_secs(3600);
    let dry = retention::sweep(dir.join("live"), max_age, true).unwrap();
    assert!(dry.dry_run);
    let listed: BTreeSet<_> = dry.deleted.iter().cloned().collect();
    assert_eq!(
        listed,
        BTreeSet::from([old_clip.clone(), old_thumb.clone(), old_clip2.clone()])
    );
    assert_eq!(dry.deleted_count(), 3);
    assert_eq!(dry.deleted_bytes, 1600);
    assert_eq!(dry.kept, 1);
    assert_eq!(dry.work_dirs_removed, std::slice::from_ref(&stale_work));
    assert!(dry.errors.is_empty(), "{:?}", dry.errors);
    let cutoff_age = SystemTime::now().duration_since(dry.cutoff).unwrap();
    assert!(cutoff_age >= max_age && cutoff_age < max_age + Duration::from_secs(60));
    for path in [&old_clip, &old_thumb, &old_clip2, &stale_work] {
        assert!(path.exists(), "a dry run deleted {}", path.display());
    }

    let real = retention::sweep(dir.join("live"), max_age, false).unwrap();
    assert!(!real.dry_run);
    assert_eq!(real.deleted_count(), 3);
    assert_eq!(real.deleted_bytes, 1600);
    for path in [&old_clip, &old_thumb, &old_clip2, &stale_work] {
        assert!(!path.exists(), "{} not deleted", path.display());
    }
    for path in [&new_clip, &notes, &hidden, &fresh_work] {
        assert!(path.exists(), "{} deleted", path.display());
    }
    let again = retention::sweep(dir.join("live"), max_age, false).unwrap();
    assert_eq!(again.deleted_count(), 0);

    let err = retention::sweep(dir.join("missing"), max_age, true).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Io);
}

#[test]
fn retention_reports_a_file_it_cannot_delete_and_goes_on() {
    let dir = tempdir("retention-locked");
    let old = SystemTime::now() - Duration::from_secs(2 * 3600);
    let write_old = |path: &Path| {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, b"clip").unwrap();
        std::fs::File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(old)
            .unwrap();
    };
    let locked = dir.join("locked/a.mp4");
    let free = dir.join("free/b.mp4");
    write_old(&locked);
    write_old(&free);
    let Some(_lock) = Undeletable::make(&locked) else {
        eprintln!("skipped: cannot make an undeletable file here (root without chattr)");
        return;
    };
    let report = retention::sweep(&dir, Duration::from_secs(3600), false).unwrap();
    assert_eq!(report.deleted, std::slice::from_ref(&free));
    assert_eq!(report.errors.len(), 1, "{:?}", report.errors);
    assert_eq!(report.errors[0].path, locked);
    assert_eq!(report.errors[0].error.kind(), ErrorKind::Io);
    assert!(locked.exists() && !free.exists());
}

/// Makes a file undeletable for the test's lifetime: its directory read-only, or (as root, who
/// ignores permissions) the file immutable with `chattr +i`.
struct Undeletable {
    file: PathBuf,
    chattr: bool,
}

impl Undeletable {
    fn make(file: &Path) -> Option<Undeletable> {
        use std::os::unix::fs::PermissionsExt;
        let parent = file.parent()?;
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o555)).ok()?;
        let probe = parent.join("probe");
        if std::fs::write(&probe, b"").is_err() {
            return Some(Undeletable {
                file: file.to_path_buf(),
                chattr: false,
            });
        }
        // Root: permissions do not stop it.
        let _ = std::fs::remove_file(&probe);
        std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755)).ok()?;
        let ok = std::process::Command::new("chattr")
            .arg("+i")
            .arg(file)
            .status()
            .is_ok_and(|s| s.success());
        ok.then(|| Undeletable {
            file: file.to_path_buf(),
            chattr: true,
        })
    }
}

impl Drop for Undeletable {
    fn drop(&mut self) {
        use std::os::unix::fs::PermissionsExt;
        if self.chattr {
            let _ = std::process::Command::new("chattr")
                .arg("-i")
                .arg(&self.file)
                .status();
        } else if let Some(parent) = self.file.parent() {
            let _ = std::fs::set_permissions(parent, std::fs::Permissions::from_mode(0o755));
        }
    }
}

/// A fresh directory under the system temporary directory, removed when dropped.
struct TempDir(PathBuf);

impl std::ops::Deref for TempDir {
    type Target = Path;
    fn deref(&self) -> &Path {
        &self.0
    }
}

impl AsRef<Path> for TempDir {
    fn as_ref(&self) -> &Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The frame numbers of an MP4 written to a file and read by `UriFrameSource` (blocking).
fn read_back(name: &str, mp4: &[u8]) -> Vec<u32> {
    let dir = tempdir(name);
    let path = dir.0.join("clip.mp4");
    std::fs::write(&path, mp4).unwrap();
    let source = UriFrameSource::builder(name, path.to_str().unwrap())
        .pixel_format(PixelFormat::Gray8)
        .build()
        .unwrap();
    source
        .frames()
        .map(|item| {
            let (f, _) = item.unwrap();
            barcode::read_gray8(
                f.data(),
                f.stride(),
                f.width() as usize,
                f.height() as usize,
            )
            .expect("a readable barcode")
        })
        .collect()
}

fn tempdir(name: &str) -> TempDir {
    let dir = std::env::temp_dir().join(format!(
        "kvs-frames-{name}-{}-{:x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    TempDir(dir)
}

/// (PTS, duration) in nanoseconds of each sample of a track.
type Times = Vec<(u64, u64)>;

/// The samples of a clip's video and audio tracks, as `qtdemux` gives them.
fn track_times(mp4: &[u8]) -> (Times, Times) {
    gst::init().unwrap();
    let dir = tempdir("track-times");
    let path = dir.0.join("clip.mp4");
    std::fs::write(&path, mp4).unwrap();
    let pipeline = gst::parse::launch(&format!(
        "filesrc location={} ! qtdemux name=d \
         d.video_0 ! queue max-size-buffers=0 max-size-bytes=0 max-size-time=0 ! appsink name=v sync=false async=false \
         d.audio_0 ! queue max-size-buffers=0 max-size-bytes=0 max-size-time=0 ! appsink name=a sync=false async=false",
        path.display()
    ))
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let collect = |name: &str| {
        let out = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let sink = pipeline
            .by_name(name)
            .unwrap()
            .downcast::<gst_app::AppSink>()
            .unwrap();
        let o = std::sync::Arc::clone(&out);
        sink.set_callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |s| {
                    let sample = s.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    let b = sample.buffer().unwrap();
                    o.lock().unwrap().push((
                        b.pts().map_or(0, |t| t.nseconds()),
                        b.duration().map_or(0, |t| t.nseconds()),
                    ));
                    Ok(gst::FlowSuccess::Ok)
                })
                .build(),
        );
        out
    };
    let video = collect("v");
    let audio = collect("a");
    pipeline.set_state(gst::State::Playing).unwrap();
    let bus = pipeline.bus().unwrap();
    let msg = bus
        .timed_pop_filtered(
            gst::ClockTime::from_seconds(30),
            &[gst::MessageType::Eos, gst::MessageType::Error],
        )
        .expect("end of the clip");
    assert!(matches!(msg.view(), gst::MessageView::Eos(_)), "{msg:?}");
    pipeline.set_state(gst::State::Null).unwrap();
    let v = video.lock().unwrap().clone();
    let a = audio.lock().unwrap().clone();
    (v, a)
}

/// Streams with an AAC track 2 (H.264 at 25 fps; H.265 at 29.97 fps): GetClip keeps it, and so
/// does a clip joined from several calls: the audio is contiguous and starts and ends with the
/// video (within one AAC frame, 21.3 ms), while the video holds exactly the ground-truth frames,
/// also when the clip file is read back by `UriFrameSource`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clips_of_streams_with_audio_keep_track_2_in_sync() {
    let emulator = common::start(vec![
        small("av-clip").audio(true).history(Duration::from_secs(8)),
        small("av-ntsc-hevc")
            .audio(true)
            .codec(VideoCodec::H265)
            .frame_rate(kvs_emulator::FrameRate::NTSC)
            .fragment_duration(Duration::from_millis(1001))
            .history(Duration::from_secs(8)),
    ]);
    let aac_ns = 1024 * 1_000_000_000 / 48_000;
    for stream in ["av-clip", "av-ntsc-hevc"] {
        common::wait_fragments(&emulator, stream, 8, Duration::from_secs(60)).await;
        let truth = emulator.ground_truth(stream);
        let request = ClipRequest::new(stream, truth[1].producer_start, truth[6].producer_start);
        let expected = expected_frames(&truth[1..=6]);
        for per_call in [200, 2] {
            let what = format!("{stream}, {per_call} fragments per call");
            let clips = ClipExtractor::new(
                KvsClient::new(&emulator.sdk_config()),
                fast().max_fragments_per_call(per_call),
            )
            .unwrap();
            let clip = clips.extract_to_bytes(&request).await.unwrap();
            let mp4 = clip.mp4.clone();
            let (video, audio) = tokio::task::spawn_blocking(move || track_times(&mp4))
                .await
                .unwrap();
            let mp4 = clip.mp4.clone();
            let frames = tokio::task::spawn_blocking(move || decoded_frames(mp4))
                .await
                .unwrap();
            assert_eq!(frames, expected, "{what}");
            assert!(!audio.is_empty(), "{what}: no audio track");
            for pair in audio.windows(2) {
                let gap = pair[1].0 as i64 - (pair[0].0 + pair[0].1) as i64;
                assert!(gap.abs() <= 1_000_000, "{what}: audio gap/overlap {gap} ns");
            }
            let v_start = video.iter().map(|v| v.0).min().unwrap();
            let v_end = video.iter().map(|v| v.0 + v.1).max().unwrap();
            let a_start = audio[0].0;
            let a_end = audio.last().map(|a| a.0 + a.1).unwrap();
            assert!(
                a_start >= v_start && a_start - v_start <= aac_ns,
                "{what}: audio starts at {a_start}, video at {v_start}"
            );
            assert!(
                (a_end as i64 - v_end as i64).unsigned_abs() <= aac_ns,
                "{what}: audio ends at {a_end}, video at {v_end}"
            );
            // The joined file, read by UriFrameSource: the same frames.
            let from_file = tokio::task::spawn_blocking(move || read_back("av-file", &clip.mp4))
                .await
                .unwrap();
            assert_eq!(from_file, expected, "{what}: read back by UriFrameSource");
        }
    }
}
