//! KvsHlsFrameSource against the emulator: real HTTP, real GStreamer, ground truth from the
//! emulator's camera (every frame's number is in its barcode).
#![cfg(feature = "emulator")]

mod common;

use std::time::{Duration, Instant, SystemTime};

use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::emulator::{Emulator, barcode};
use kvs_frames::{
    DeliveryPolicy, ErrorKind, Frame, KvsHlsFrameSource, KvsHlsFrameSourceBuilder, PixelFormat,
    PlaybackMode, SourceState,
};

fn source(emulator: &Emulator, stream: &str) -> KvsHlsFrameSourceBuilder {
    KvsHlsFrameSource::builder("test-camera", stream)
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Gray8)
        .request_timeout(Duration::from_secs(3))
}

fn number(frame: &Frame) -> u32 {
    let n = match frame.format() {
        PixelFormat::Gray8 => barcode::read_gray8(
            frame.data(),
            frame.stride(),
            frame.width() as usize,
            frame.height() as usize,
        ),
        PixelFormat::Bgr => barcode::read_packed(
            frame.data(),
            frame.stride(),
            frame.width() as usize,
            frame.height() as usize,
            3,
            1,
        ),
        other => panic!("no barcode reader for {other}"),
    };
    n.unwrap_or_else(|| panic!("unreadable barcode in {frame:?}"))
}

/// Takes `n` frames, failing after `timeout` per frame.
fn take(source: &KvsHlsFrameSource, n: usize, timeout: Duration) -> Vec<Frame> {
    common::frames::take_frames(source.frames(), n, timeout, || source.stats())
}

/// Frame numbers are consecutive and producer times are those of the emulator's camera.
fn assert_exact(emulator: &Emulator, stream: &str, frames: &[Frame]) {
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    for (i, pair) in numbers.windows(2).enumerate() {
        assert_eq!(
            pair[1],
            pair[0] + 1,
            "gap or repeat at frame {i}: {numbers:?}"
        );
    }
    for (frame, n) in frames.iter().zip(&numbers) {
        assert_eq!(
            frame.producer_time(),
            emulator.frame_producer_time(stream, u64::from(*n)),
            "producer time of frame {n}"
        );
    }
}

#[test]
fn live_frames_arrive_at_the_camera_rate_with_exact_producer_times() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1").build().unwrap();
    let started = Instant::now();
    let frames = take(&source, 100, Duration::from_secs(10));
    let elapsed = started.elapsed();
    assert_exact(&emulator, "cam-1", &frames);
    for pair in frames.windows(2) {
        let step = pair[1]
            .producer_time()
            .unwrap()
            .duration_since(pair[0].producer_time().unwrap())
            .unwrap();
        assert_eq!(step, Duration::from_millis(40));
    }
    // 100 frames at 25 fps take about 4 s of real time (live pace, not a burst).
    assert!(elapsed > Duration::from_secs(2), "{elapsed:?}");
    let stats = source.stats();
    assert_eq!(source.state(), SourceState::Connected);
    assert!(source.is_healthy());
    assert_eq!(stats.pipelines_built, 1);
    assert_eq!(stats.sessions, 1);
    assert!(stats.frames_delivered >= 100);
    assert!(frames.iter().all(|f| f.width() == 320 && f.height() == 240));
    assert!(frames[0].fragment().unwrap().program_date_time.is_some());
    let age = frames[99].age().unwrap();
    assert!(age < Duration::from_secs(5), "live latency {age:?}");
    source.stop();
    assert_eq!(source.state(), SourceState::Disconnected);
    assert!(
        source.frames().next().is_none(),
        "the iterator ends after stop"
    );
}

#[test]
fn proactive_refresh_loses_and_repeats_nothing_and_keeps_the_pipeline() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .expires(Duration::from_secs(300))
        .refresh_margin(Duration::from_secs(295))
        .delivery(DeliveryPolicy::Block)
        .build()
        .unwrap();
    // 30 s of video at 25 fps.
    let frames = take(&source, 750, Duration::from_secs(10));
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert!(stats.url_refreshes >= 5, "{stats:?}");
    assert_eq!(stats.pipelines_built, 1, "one pipeline for the whole run");
    assert_eq!(stats.reconnects, 0, "{stats:?}");
    let sessions: std::collections::BTreeSet<u64> = frames
        .iter()
        .map(|f| f.fragment().unwrap().session)
        .collect();
    assert!(sessions.len() >= 5, "frames came through {sessions:?}");
}

#[test]
fn reactive_refresh_after_revocation_loses_nothing() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .build()
        .unwrap();
    let mut frames = take(&source, 50, Duration::from_secs(10));
    emulator.faults("cam-1").unwrap().revoke_sessions();
    frames.extend(take(&source, 150, Duration::from_secs(10)));
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert!(stats.url_refreshes >= 1, "{stats:?}");
    assert_eq!(
        stats.reconnects, 0,
        "a 403 is a refresh, not a reconnect: {stats:?}"
    );
    assert!(
        emulator
            .request_stats()
            .errors
            .get("NotAuthorizedException")
            .copied()
            .unwrap_or(0)
            >= 1
    );
}

#[test]
fn camera_offline_reconnects_with_backoff_and_resumes() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let backoff = BackoffPolicy::default()
        .initial(Duration::from_secs(1))
        .max(Duration::from_secs(4))
        .jitter(Jitter::Fixed(1.0))
        .max_consecutive_errors(None);
    let source = source(&emulator, "cam-1")
        .stall_timeout(Duration::from_secs(4))
        .backoff(backoff)
        .build()
        .unwrap();
    let before = take(&source, 25, Duration::from_secs(10));
    emulator
        .faults("cam-1")
        .unwrap()
        .camera_offline(Duration::from_secs(40));
    // Frames stop; the source goes Reconnecting and backs off.
    let deadline = Instant::now() + Duration::from_secs(45);
    let mut saw_reconnecting = false;
    let mut after = Vec::new();
    let mut frames = source.frames();
    while Instant::now() < deadline && after.len() < 50 {
        saw_reconnecting |= source.state() == SourceState::Reconnecting;
        if let Some(item) = frames.next_timeout(Duration::from_millis(200)) {
            let (frame, _) = item.unwrap();
            if number(&frame) > number(&before[24]) + 25 * 10 {
                after.push(frame);
            }
        }
    }
    assert!(saw_reconnecting, "state Reconnecting during the outage");
    assert_eq!(
        after.len(),
        50,
        "frames resume after the camera returns: {:?}",
        source.stats()
    );
    assert_exact(&emulator, "cam-1", &after);
    let stats = source.stats();
    assert!(stats.reconnects >= 3, "{stats:?}");
    // Deterministic backoff (jitter fixed at 1): 1 s, 2 s, 4 s, then capped at 4 s.
    let secs: Vec<u64> = stats.backoff_history.iter().map(|d| d.as_secs()).collect();
    assert_eq!(&secs[..3], &[1, 2, 4], "{secs:?}");
    assert!(secs.iter().all(|s| *s <= 4), "{secs:?}");
    assert_eq!(source.state(), SourceState::Connected);
    assert!(stats.read_errors >= stats.reconnects);
}

fn quick_backoff() -> BackoffPolicy {
    BackoffPolicy::default()
        .initial(Duration::from_millis(500))
        .max(Duration::from_secs(1))
        .jitter(Jitter::Fixed(1.0))
        .max_consecutive_errors(None)
}

#[test]
fn http_faults_recover_without_losing_frames() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .stall_timeout(Duration::from_secs(2))
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let faults = emulator.faults("cam-1").unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    let mut reconnects = source.stats().reconnects;
    let window = Duration::from_millis(1500);
    for (name, inject) in [
        (
            "HTTP 500",
            Box::new(|| faults.server_errors(window)) as Box<dyn Fn()>,
        ),
        (
            "connection reset",
            Box::new(|| faults.reset_fragment_downloads(window)),
        ),
        ("throttling", Box::new(|| faults.throttle(window))),
        (
            "stalled download",
            Box::new(|| faults.stall_fragment_downloads(window, Duration::from_secs(20))),
        ),
    ] {
        inject();
        frames.extend(take(&source, 100, Duration::from_secs(15)));
        let now = source.stats().reconnects;
        assert!(
            now > reconnects,
            "{name}: no reconnect observed: {:?}",
            source.stats()
        );
        reconnects = now;
    }
    assert_exact(&emulator, "cam-1", &frames);
    assert_eq!(source.stats().pipelines_built, 1);
}

#[test]
fn stream_deletion_ends_the_iterator_with_a_fatal_error() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .backoff(quick_backoff())
        .build()
        .unwrap();
    take(&source, 10, Duration::from_secs(10));
    emulator.faults("cam-1").unwrap().delete_stream();
    let mut frames = source.frames();
    let deadline = Instant::now() + Duration::from_secs(20);
    let error = loop {
        assert!(
            Instant::now() < deadline,
            "no fatal error: {:?}",
            source.stats()
        );
        match frames.next_timeout(Duration::from_secs(1)) {
            Some(Ok(_)) | None => continue,
            Some(Err(e)) => break e,
        }
    };
    assert_eq!(error.kind(), ErrorKind::StreamNotFound, "{error}");
    assert!(!error.is_transient());
    assert!(
        frames.next_timeout(Duration::from_secs(1)).is_none(),
        "ended"
    );
    assert_eq!(source.state(), SourceState::Error);
    assert!(source.stats().last_error.unwrap().contains("cam-1"));
}

#[test]
fn resolution_change_switches_frame_size_without_a_stall() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .build()
        .unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    emulator
        .faults("cam-1")
        .unwrap()
        .change_resolution(480, 270);
    frames.extend(take(&source, 100, Duration::from_secs(10)));
    assert_exact(&emulator, "cam-1", &frames);
    assert_eq!((frames[0].width(), frames[0].height()), (320, 240));
    let last = frames.last().unwrap();
    assert_eq!((last.width(), last.height()), (480, 270));
    let switch = frames.iter().position(|f| f.width() == 480).unwrap();
    assert!(frames[switch..].iter().all(|f| f.width() == 480));
    assert_eq!(source.stats().reconnects, 0);
}

fn history(name: &str, seconds: u64) -> Emulator {
    let emulator = common::start(vec![
        common::small(name).history(Duration::from_secs(seconds)),
    ]);
    assert!(emulator.wait_for_fragments(name, seconds as usize, Duration::from_secs(30)));
    emulator
}

fn drain(source: &KvsHlsFrameSource) -> Vec<Frame> {
    common::frames::drain_frames(source.frames(), Duration::from_secs(15), || source.stats())
}

fn expected(
    emulator: &Emulator,
    stream: &str,
    fragments: std::ops::RangeInclusive<usize>,
) -> Vec<u32> {
    let truth = emulator.ground_truth(stream);
    truth[fragments]
        .iter()
        .flat_map(|r| (r.first_frame..r.first_frame + u64::from(r.frame_count)).map(|n| n as u32))
        .collect()
}

#[test]
fn on_demand_and_live_replay_deliver_exactly_the_range() {
    let emulator = history("cam-1", 10);
    let truth = emulator.ground_truth("cam-1");
    let on_demand = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[2].producer_start,
            end: truth[6].producer_start,
        })
        .build()
        .unwrap();
    let frames = drain(&on_demand);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "cam-1", 2..=6));
    assert_exact(&emulator, "cam-1", &frames);
    assert_eq!(on_demand.stats().frames_dropped(), 0);

    let replay = source(&emulator, "cam-1")
        .playback(PlaybackMode::LiveReplay {
            start: truth[1].producer_start,
            end: Some(truth[3].producer_start),
        })
        .build()
        .unwrap();
    let frames = drain(&replay);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "cam-1", 1..=3));
}

#[test]
fn long_on_demand_ranges_continue_past_one_playlist() {
    let emulator = history("cam-1", 8);
    let truth = emulator.ground_truth("cam-1");
    // Three fragments per playlist: the range needs three sessions.
    let source = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[0].producer_start,
            end: truth[7].producer_start,
        })
        .max_playlist_fragments(3)
        .build()
        .unwrap();
    let numbers: Vec<u32> = drain(&source).iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "cam-1", 0..=7));
    assert!(source.stats().sessions >= 3);
}

#[test]
fn slow_readers_drop_oldest_or_block() {
    let emulator = common::start(vec![common::small("cam-1").history(Duration::from_secs(6))]);
    assert!(emulator.wait_for_fragments("cam-1", 6, Duration::from_secs(30)));
    // DropOldest: memory stays bounded, drops are counted.
    let live = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::DropOldest)
        .queue_capacity(5)
        .build()
        .unwrap();
    let mut frames = live.frames();
    let mut max_queue = 0;
    let mut got = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(4);
    while Instant::now() < deadline {
        if let Some(Ok((frame, _))) = frames.next_timeout(Duration::from_secs(5)) {
            got.push(number(&frame));
        }
        max_queue = max_queue.max(live.stats().queue_len);
        std::thread::sleep(Duration::from_millis(100)); // 10 fps reader, 25 fps camera
    }
    let stats = live.stats();
    assert!(stats.frames_dropped_queue_full > 0, "{stats:?}");
    assert!(max_queue <= 5);
    assert!(got.windows(2).all(|w| w[1] > w[0]), "order kept");
    live.stop();

    // Block: a slow reader of an archived range loses nothing.
    let truth = emulator.ground_truth("cam-1");
    let archive = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[1].producer_start,
            end: truth[3].producer_start,
        })
        .queue_capacity(2)
        .build()
        .unwrap();
    let mut numbers = Vec::new();
    for item in archive.frames() {
        let (frame, _) = item.unwrap();
        numbers.push(number(&frame));
        std::thread::sleep(Duration::from_millis(10));
    }
    assert_eq!(numbers, expected(&emulator, "cam-1", 1..=3));
    assert_eq!(archive.stats().frames_dropped(), 0);
}

#[test]
fn every_invalid_option_is_a_typed_error_naming_it() {
    let emulator = common::start(vec![common::small("cam-1").camera(false)]);
    let now = SystemTime::now();
    let hour = Duration::from_secs(3600);
    let cases: Vec<(&str, KvsHlsFrameSourceBuilder)> = vec![
        ("camera_id", KvsHlsFrameSource::builder("", "cam-1")),
        ("stream_name", KvsHlsFrameSource::builder("c", "bad name")),
        (
            "stream_arn",
            KvsHlsFrameSource::builder("c", "arn:".to_owned() + &"x".repeat(1100)),
        ),
        (
            "expires",
            source(&emulator, "cam-1").expires(Duration::from_secs(299)),
        ),
        (
            "expires",
            source(&emulator, "cam-1").expires(Duration::from_secs(43_201)),
        ),
        (
            "refresh_margin",
            source(&emulator, "cam-1")
                .expires(Duration::from_secs(300))
                .refresh_margin(Duration::from_secs(300)),
        ),
        (
            "max_playlist_fragments",
            source(&emulator, "cam-1").max_playlist_fragments(0),
        ),
        (
            "max_playlist_fragments",
            source(&emulator, "cam-1").max_playlist_fragments(5001),
        ),
        (
            "playback",
            source(&emulator, "cam-1").playback(PlaybackMode::OnDemand {
                start: now,
                end: now - hour,
            }),
        ),
        (
            "playback",
            source(&emulator, "cam-1").playback(PlaybackMode::OnDemand {
                start: now - 25 * hour,
                end: now,
            }),
        ),
        (
            "container",
            source(&emulator, "cam-1").container(kvs_frames::source::Container::MpegTs),
        ),
        (
            "poll_interval",
            source(&emulator, "cam-1").poll_interval(Duration::from_millis(10)),
        ),
        (
            "request_timeout",
            source(&emulator, "cam-1").request_timeout(Duration::ZERO),
        ),
        (
            "stall_timeout",
            source(&emulator, "cam-1").stall_timeout(Duration::from_secs(3600)),
        ),
        ("resize", source(&emulator, "cam-1").resize(641, 480)),
        ("target_fps", source(&emulator, "cam-1").target_fps(0.0)),
        (
            "target_fps",
            source(&emulator, "cam-1").target_fps(f64::NAN),
        ),
        (
            "queue_capacity",
            source(&emulator, "cam-1").queue_capacity(0),
        ),
        (
            "backoff.initial",
            source(&emulator, "cam-1").backoff(BackoffPolicy::default().initial(Duration::ZERO)),
        ),
        (
            "backoff.max_consecutive_errors",
            source(&emulator, "cam-1")
                .backoff(BackoffPolicy::default().max_consecutive_errors(Some(0))),
        ),
    ];
    for (option, builder) in cases {
        let err = builder.build().expect_err(option);
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{option}: {err}");
        assert_eq!(err.invalid_option(), Some(option), "{err}");
        assert!(err.to_string().contains(option), "{err}");
    }
    // The pixel format parser names the value too.
    let err = "yuv444".parse::<PixelFormat>().unwrap_err();
    assert!(err.to_string().contains("yuv444"));
}

#[test]
fn metrics_carry_the_promised_names_and_the_camera_label() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let registry = prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    assert!(
        kvs_frames::metrics::FrameSourceMetrics::register(&registry).is_err(),
        "once per registry"
    );
    let source = KvsHlsFrameSource::builder("front-door", "cam-1")
        .sdk_config(&emulator.sdk_config())
        .metrics(metrics)
        .build()
        .unwrap();
    take(&source, 30, Duration::from_secs(10));
    let mut text = String::new();
    for family in registry.gather() {
        text.push_str(
            &prometheus::TextEncoder::new()
                .encode_to_string(&[family])
                .unwrap(),
        );
    }
    for name in [
        "kvs_hls_frames_total",
        "kvs_hls_reconnects_total",
        "kvs_hls_url_refreshes_total",
        "kvs_hls_read_errors_total",
        "kvs_hls_last_frame_timestamp",
        "kvs_hls_connection_state",
        "kvs_hls_frames_dropped_total",
        "kvs_hls_fragments_total",
        "kvs_hls_fragment_bytes_total",
        "kvs_hls_fragment_fetch_seconds",
        "kvs_hls_frame_age_seconds",
    ] {
        assert!(
            text.lines()
                .any(|l| l.starts_with(name) && l.contains("camera_id=\"front-door\"")),
            "{name} missing:\n{text}"
        );
    }
    assert!(
        text.contains("kvs_hls_connection_state{camera_id=\"front-door\"} 2"),
        "{text}"
    );
    let frames_line = text
        .lines()
        .find(|l| l.starts_with("kvs_hls_frames_total{"))
        .unwrap();
    let count: f64 = frames_line.rsplit(' ').next().unwrap().parse().unwrap();
    assert!(count >= 30.0);
}

#[test]
fn async_stream_and_sync_iterator_give_the_same_frames() {
    let emulator = history("cam-1", 5);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[1].producer_start,
        end: truth[3].producer_start,
    };
    let sync: Vec<(u32, Option<SystemTime>)> =
        drain(&source(&emulator, "cam-1").playback(range).build().unwrap())
            .iter()
            .map(|f| (number(f), f.producer_time()))
            .collect();
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let builder = source(&emulator, "cam-1").playback(range);
    let streamed: Vec<(u32, Option<SystemTime>)> = runtime.block_on(async move {
        use futures_util::StreamExt;
        let source = builder.build().unwrap();
        let mut stream = source.stream();
        let mut out = Vec::new();
        while let Some(item) = stream.next().await {
            let (frame, ts) = item.unwrap();
            assert_eq!(Some(ts), frame.producer_time());
            out.push((number(&frame), frame.producer_time()));
        }
        out
    });
    assert_eq!(sync, streamed);
    assert_eq!(sync.len(), expected(&emulator, "cam-1", 1..=3).len());
}

#[test]
fn target_fps_and_key_frames_only_sample_the_stream() {
    let emulator = history("cam-1", 5);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[3].producer_start,
    };
    let five = drain(
        &source(&emulator, "cam-1")
            .playback(range)
            .target_fps(5.0)
            .build()
            .unwrap(),
    );
    let numbers: Vec<u32> = five.iter().map(number).collect();
    assert_eq!(numbers.len(), 20, "4 s at 5 fps: {numbers:?}");
    assert!(numbers.windows(2).all(|w| w[1] - w[0] == 5), "{numbers:?}");
    let keys = source(&emulator, "cam-1")
        .playback(range)
        .key_frames_only(true)
        .build()
        .unwrap();
    let frames = drain(&keys);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    let firsts: Vec<u32> = truth[0..=3].iter().map(|r| r.first_frame as u32).collect();
    assert_eq!(numbers, firsts, "one frame per fragment, its key frame");
    assert!(frames.iter().all(Frame::is_key_frame));
    assert_exact(&emulator, "cam-1", &frames[..1]);
}

#[test]
fn every_pixel_format_and_resize() {
    let emulator = history("cam-1", 2);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[0].producer_start + Duration::from_millis(1),
    };
    for format in PixelFormat::ALL {
        let source = source(&emulator, "cam-1")
            .playback(range)
            .pixel_format(format)
            .resize(160, 120)
            .build()
            .unwrap();
        let frames = drain(&source);
        assert_eq!(frames.len(), 25, "{format}");
        let f = &frames[0];
        assert_eq!((f.width(), f.height(), f.format()), (160, 120, format));
        match format.bytes_per_pixel() {
            Some(bpp) => {
                assert_eq!(f.n_planes(), 1);
                assert!(f.stride() >= 160 * bpp);
                assert_eq!(f.row(119).unwrap().len(), 160 * bpp);
                assert_eq!(f.to_contiguous().len(), 160 * 120 * bpp);
            }
            None => {
                let planes = if format == PixelFormat::I420 { 3 } else { 2 };
                assert_eq!(f.n_planes(), planes);
                assert_eq!(f.plane(0).unwrap().len(), f.plane_stride(0).unwrap() * 120);
                assert!(f.plane(1).unwrap().len() >= 160 * 60 / 2);
            }
        }
        if format == PixelFormat::Bgr || format == PixelFormat::Gray8 {
            assert_exact(&emulator, "cam-1", &frames);
        }
    }
}

/// Captured log output (the whole process: nextest runs each test in its own process).
#[derive(Clone, Default)]
struct Captured(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn session_tokens_never_reach_logs_errors_or_debug_output() {
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("kvs_frames=trace")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .expires(Duration::from_secs(300))
        .refresh_margin(Duration::from_secs(298))
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let frames = take(&source, 50, Duration::from_secs(10));
    emulator.faults("cam-1").unwrap().revoke_sessions();
    emulator
        .faults("cam-1")
        .unwrap()
        .server_errors(Duration::from_millis(2500));
    let more = take(&source, 75, Duration::from_secs(15));
    // A playlist no parser accepts, its token URLs in the rest of the body (the parser's own
    // error message would print them), and a fragment download cut short.
    {
        use kvs_frames::emulator::{Failure, Request};
        let faults = emulator.faults("cam-1").unwrap();
        faults.fail_next(Request::MediaPlaylist, Failure::Corrupt, 1);
        faults.fail_next(Request::MediaFragment, Failure::Reset, 1);
    }
    let errors_before = source.stats().read_errors;
    let last = take(&source, 50, Duration::from_secs(15));
    let stats = source.stats();
    assert!(
        stats.url_refreshes >= 1 && stats.read_errors > errors_before,
        "{stats:?}"
    );
    let text = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(text.contains("session"), "logs were captured: {text}");
    assert!(
        text.contains("cannot parse the media playlist"),
        "the corrupt playlist was read and reported: {text}"
    );
    let debug = format!(
        "{source:?} {stats:?} {:?} {:?} {:?} {:?}",
        frames[0], more[0], last[0], stats.last_error
    );
    // Every token the emulator issued, as issued and percent-encoded as in its URLs.
    let tokens = emulator.issued_session_tokens();
    assert!(
        tokens.len() >= 2,
        "a refresh issued a second token: {tokens:?}"
    );
    let encode = |t: &str| -> String {
        t.bytes()
            .map(|b| {
                if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                    char::from(b).to_string()
                } else {
                    format!("%{b:02X}")
                }
            })
            .collect()
    };
    for output in [&text, &debug] {
        for token in &tokens {
            // A token is long: its middle third alone must not appear either.
            let third = &token[token.len() / 3..2 * token.len() / 3];
            // And as the decimal bytes a parser's Debug output prints (`[67, 105, 65, …]`).
            let bytes = encode(token)
                .bytes()
                .take(12)
                .map(|b| b.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            for form in [token.clone(), encode(token), third.to_owned(), bytes] {
                assert!(!output.contains(&form), "token leaked ({form}):\n{output}");
            }
        }
        assert!(
            !output.contains(kvs_frames::emulator::SECRET_ACCESS_KEY),
            "secret leaked"
        );
    }
}

/// The value of a metric series `name{camera_id="…"}` in the registry's text output.
fn metric(registry: &prometheus::Registry, series: &str) -> Option<f64> {
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// The default backoff policy with short delays (and no explicit error limit).
fn default_backoff_quick() -> BackoffPolicy {
    BackoffPolicy::default()
        .initial(Duration::from_millis(300))
        .max(Duration::from_millis(600))
        .jitter(Jitter::Fixed(1.0))
}

#[test]
fn a_live_source_never_gives_up_on_a_long_outage_by_default() {
    let emulator = common::start(vec![common::small("cam-1")]);
    let faults = emulator.faults("cam-1").unwrap();
    faults.camera_offline(Duration::from_secs(3600));
    assert!(
        emulator.ground_truth("cam-1").is_empty(),
        "the camera is offline from the start"
    );
    let registry = prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    let source = source(&emulator, "cam-1")
        .backoff(default_backoff_quick())
        .metrics(metrics)
        .build()
        .unwrap();
    let mut frames = source.frames();
    // Far more errors in a row than the old default limit (10): the source keeps trying.
    let deadline = Instant::now() + Duration::from_secs(60);
    while source.stats().consecutive_errors < 16 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        if let Some(item) = frames.next_timeout(Duration::from_millis(200)) {
            panic!("nothing may come out during the outage: {item:?}");
        }
    }
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Reconnecting, "{stats:?}");
    assert!(!source.is_healthy());
    let since = stats.reconnecting_since.expect("the outage is dated");
    assert!(
        since.elapsed().unwrap() >= Duration::from_secs(4),
        "{stats:?}"
    );
    assert!(
        stats
            .last_error
            .as_deref()
            .unwrap()
            .contains("No fragments"),
        "{stats:?}"
    );
    assert_eq!(
        metric(
            &registry,
            "kvs_hls_connection_state{camera_id=\"test-camera\"}"
        ),
        Some(3.0)
    );
    assert!(
        metric(
            &registry,
            "kvs_hls_reconnects_total{camera_id=\"test-camera\"}"
        )
        .unwrap()
            >= 15.0
    );
    // The camera comes back: frames flow again, exactly.
    faults.camera_offline(Duration::ZERO);
    let got = take(&source, 50, Duration::from_secs(15));
    assert_exact(&emulator, "cam-1", &got);
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Connected);
    assert_eq!(stats.consecutive_errors, 0);
    assert_eq!(stats.reconnecting_since, None);
    assert!(source.is_healthy());
}

#[test]
fn an_empty_range_wholly_in_the_past_ends_at_once_with_no_fragments() {
    let emulator = history("cam-1", 3);
    let long_ago = SystemTime::now() - Duration::from_secs(7200);
    let ranges = [
        PlaybackMode::OnDemand {
            start: long_ago,
            end: long_ago + Duration::from_secs(60),
        },
        PlaybackMode::LiveReplay {
            start: long_ago,
            end: Some(long_ago + Duration::from_secs(60)),
        },
    ];
    for (i, playback) in ranges.into_iter().enumerate() {
        let source = source(&emulator, "cam-1")
            .playback(playback)
            .backoff(default_backoff_quick())
            .build()
            .unwrap();
        let mut frames = source.frames();
        let error = match frames.next_timeout(Duration::from_secs(15)) {
            Some(Err(e)) => e,
            other => panic!("{playback:?}: expected the range's end as an error, got {other:?}"),
        };
        assert_eq!(error.kind(), ErrorKind::NoFragments, "{error}");
        assert!(error.to_string().contains("range"), "{error}");
        assert!(frames.next_timeout(Duration::from_secs(1)).is_none());
        assert_eq!(source.state(), SourceState::Error);
        // One GetHLSStreamingSessionURL per source: no retry.
        let calls = emulator.request_stats().api_calls["GetHLSStreamingSessionURL"];
        assert_eq!(calls, i as u64 + 1, "{playback:?}");
    }
}

/// The first error the iterator yields within `timeout` (frames before it are skipped).
fn first_error(source: &KvsHlsFrameSource, timeout: Duration) -> kvs_frames::Error {
    let deadline = Instant::now() + timeout;
    let mut frames = source.frames();
    while Instant::now() < deadline {
        if let Some(Err(e)) = frames.next_timeout(Duration::from_millis(100)) {
            return e;
        }
    }
    panic!("no error within {timeout:?}: {:?}", source.stats());
}

#[test]
fn the_iterator_ends_when_the_runtime_of_the_control_task_shuts_down() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let source = source(&emulator, "cam-1")
        .runtime(runtime.handle().clone())
        .build()
        .unwrap();
    take(&source, 10, Duration::from_secs(10));
    runtime.shutdown_timeout(Duration::from_secs(1));
    let error = first_error(&source, Duration::from_secs(5));
    assert_eq!(error.kind(), ErrorKind::Internal, "{error}");
    assert!(error.to_string().contains("runtime"), "{error}");
    assert!(
        source
            .frames()
            .next_timeout(Duration::from_secs(1))
            .is_none()
    );
    assert_eq!(source.state(), SourceState::Error);
}

/// Builds a source twice, waits each time until `ready` says it is in the state under test,
/// then ends the first with `stop()` and the second by dropping it: both return within 1 s.
fn assert_stops_fast(
    what: &str,
    build: impl Fn() -> KvsHlsFrameSource,
    ready: impl Fn(&KvsHlsFrameSource) -> bool,
) {
    for how in ["stop", "drop"] {
        let source = build();
        let deadline = Instant::now() + Duration::from_secs(30);
        while !ready(&source) {
            assert!(
                Instant::now() < deadline,
                "{what}: the state was not reached: {:?}",
                source.stats()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let started = Instant::now();
        if how == "stop" {
            source.stop();
            assert_eq!(source.state(), SourceState::Disconnected, "{what}");
            assert!(
                source.frames().next().is_none(),
                "{what}: the iterator ends"
            );
        } else {
            drop(source);
        }
        let took = started.elapsed();
        assert!(took < Duration::from_secs(1), "{what}: {how} took {took:?}");
    }
}

#[test]
fn stop_and_drop_return_within_a_second_in_every_state() {
    use kvs_frames::emulator::{Failure, Request};
    let emulator = common::start(vec![
        common::small("cam-1"),
        common::small("dark").camera(false),
        common::small("stalled"),
        common::small("archive").history(Duration::from_secs(4)),
    ]);
    assert!(emulator.wait_for_fragments("archive", 4, Duration::from_secs(30)));
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    assert!(emulator.wait_for_fragments("stalled", 1, Duration::from_secs(10)));
    let truth = emulator.ground_truth("archive");
    let slow = BackoffPolicy::default()
        .initial(Duration::from_secs(60))
        .jitter(Jitter::Fixed(1.0));

    // Connecting, GetHLSStreamingSessionURL in flight to a service that never answers.
    let blackhole = common::blackhole::Blackhole::start();
    let hung = emulator
        .sdk_config()
        .to_builder()
        .endpoint_url(format!("http://127.0.0.1:{}", blackhole.port))
        .build();
    assert_stops_fast(
        "connecting",
        || {
            KvsHlsFrameSource::builder("c", "cam-1")
                .sdk_config(&hung)
                .build()
                .unwrap()
        },
        |s| blackhole.accepted() > 0 && s.state() == SourceState::Connecting,
    );

    // Waiting out a 60 s backoff (no fragments).
    assert_stops_fast(
        "backoff",
        || {
            source(&emulator, "dark")
                .backoff(slow.clone())
                .build()
                .unwrap()
        },
        |s| s.state() == SourceState::Reconnecting,
    );

    // A fragment download in flight that stalls for a minute.
    emulator
        .faults("stalled")
        .unwrap()
        .stall_fragment_downloads(Duration::from_secs(600), Duration::from_secs(60));
    assert_stops_fast(
        "request in flight",
        || {
            let before = emulator.request_stats().media_fragments;
            let s = source(&emulator, "stalled")
                .request_timeout(Duration::from_secs(60))
                .stall_timeout(Duration::from_secs(120))
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while emulator.request_stats().media_fragments == before {
                assert!(Instant::now() < deadline, "no fragment request");
                std::thread::sleep(Duration::from_millis(20));
            }
            s
        },
        |_| true,
    );

    // A reader that does not read: the decoder is blocked on the full queue.
    assert_stops_fast(
        "blocked reader",
        || {
            source(&emulator, "cam-1")
                .delivery(DeliveryPolicy::Block)
                .queue_capacity(1)
                .build()
                .unwrap()
        },
        |s| s.stats().frames_delivered >= 2,
    );

    // The end of an ON_DEMAND range, the reader not reading: the task waits for the decoder
    // to flush.
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[1].producer_start,
    };
    assert_stops_fast(
        "end of range",
        || {
            source(&emulator, "archive")
                .playback(range)
                .delivery(DeliveryPolicy::Block)
                .queue_capacity(1)
                .build()
                .unwrap()
        },
        |s| s.stats().fragments_fetched >= 2 && s.stats().frames_delivered >= 2,
    );

    // The end of a range whose last fragment fails to decode: the decoder never sees
    // end-of-stream (the wait for it must not hang stop).
    let last_fails = PlaybackMode::OnDemand {
        start: truth[2].producer_start,
        end: truth[2].producer_start + Duration::from_millis(1),
    };
    assert_stops_fast(
        "after a decode failure",
        || {
            emulator.faults("archive").unwrap().fail_next(
                Request::MediaFragment,
                Failure::Corrupt,
                1,
            );
            let s = source(&emulator, "archive")
                .playback(last_fails)
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while s.stats().fragments_fetched == 0 {
                assert!(Instant::now() < deadline, "{:?}", s.stats());
                std::thread::sleep(Duration::from_millis(20));
            }
            std::thread::sleep(Duration::from_millis(500));
            s
        },
        |_| true,
    );
}

#[test]
fn a_range_whose_last_fragment_fails_to_decode_ends_at_once_and_counts_it() {
    use kvs_frames::emulator::{Failure, Request};
    let emulator = history("cam-1", 4);
    let truth = emulator.ground_truth("cam-1");
    emulator
        .faults("cam-1")
        .unwrap()
        .fail_next(Request::MediaFragment, Failure::Corrupt, 1);
    let source = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[2].producer_start,
            end: truth[2].producer_start + Duration::from_millis(1),
        })
        .build()
        .unwrap();
    let started = Instant::now();
    let frames =
        common::frames::drain_frames(source.frames(), Duration::from_secs(5), || source.stats());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(frames.is_empty());
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Disconnected, "{stats:?}");
    assert_eq!(stats.decode_errors, 1, "{stats:?}");
    assert!(stats.last_error.is_some(), "{stats:?}");
}
