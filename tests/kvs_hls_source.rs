//! KvsHlsFrameSource against the emulator: real HTTP, real GStreamer, ground truth from the
//! emulator's camera (every frame's number is in its barcode).

mod common;

use std::time::{Duration, Instant, SystemTime};

use kvs_emulator::{CompositionOffsets, Emulator, FrameRate, VideoCodec, barcode};
use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::{
    DeliveryPolicy, ErrorKind, Frame, FrameGeometry, KvsHlsFrameSource, KvsHlsFrameSourceBuilder,
    PixelFormat, PlaybackMode, Rect, ResizeMode, SourceState,
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
    // A session lives 5 s here (300 s − 295 s): it is replaced at the first poll after that, so
    // every session except the last one lasted 5 s plus at most a poll interval (1 s) and a
    // fragment download; no session more, none less.
    let opened = emulator.api_call_times("GetHLSStreamingSessionURL");
    assert_eq!(opened.len() as u64, stats.sessions, "{stats:?}");
    assert_eq!(stats.url_refreshes, stats.sessions - 1, "{stats:?}");
    for pair in opened.windows(2) {
        let lived = pair[1] - pair[0];
        assert!(
            (Duration::from_millis(4950)..Duration::from_millis(7500)).contains(&lived),
            "a session lived {lived:?}: {stats:?}"
        );
    }
    let span = opened.last().unwrap().duration_since(opened[0]);
    let most = span.as_secs_f64() / 5.0;
    assert!(
        (stats.url_refreshes as f64) <= most && (stats.url_refreshes as f64) >= most * 5.0 / 7.5,
        "{} refreshes in {span:?}",
        stats.url_refreshes
    );
    assert!(stats.url_refreshes >= 4, "{stats:?}");
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
    let mut read_errors = source.stats().read_errors;
    // 1.5 s of 500s, resets or throttling fit in the quick retries inside the session (250 ms,
    // 500 ms, 1 s): no reconnect. A download that stalls is cut by the stall watchdog: a
    // reconnect after a backoff, in the same session.
    for (name, inject, reconnect) in [
        (
            "HTTP 500",
            Box::new(|| faults.server_errors(window)) as Box<dyn Fn()>,
            false,
        ),
        (
            "connection reset",
            Box::new(|| faults.reset_fragment_downloads(window)),
            false,
        ),
        ("throttling", Box::new(|| faults.throttle(window)), false),
        (
            "stalled download",
            Box::new(|| faults.stall_fragment_downloads(window, Duration::from_secs(20))),
            true,
        ),
    ] {
        inject();
        frames.extend(take(&source, 100, Duration::from_secs(15)));
        let stats = source.stats();
        assert!(
            stats.read_errors > read_errors,
            "{name}: no error seen: {stats:?}"
        );
        if reconnect {
            assert!(stats.reconnects > reconnects, "{name}: {stats:?}");
        } else {
            assert_eq!(stats.reconnects, reconnects, "{name}: {stats:?}");
        }
        read_errors = stats.read_errors;
        reconnects = stats.reconnects;
    }
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert_eq!(stats.pipelines_built, 1);
    assert_eq!(
        stats.sessions, 1,
        "every fault was recovered in the session: {stats:?}"
    );
    assert_eq!(stats.fragments_skipped, 0);
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

/// H.265 cameras (many IP cameras default to it): KVS serves them as fMP4 with `hvc1`/`hvcC`;
/// the reader decodes every frame, with exact producer times, live and from the archive.
#[test]
fn h265_streams_decode_every_frame_with_exact_producer_times() {
    let emulator = common::start(vec![
        common::small("hevc")
            .codec(VideoCodec::H265)
            .history(Duration::from_secs(6)),
    ]);
    assert!(emulator.wait_for_fragments("hevc", 6, Duration::from_secs(60)));
    let truth = emulator.ground_truth("hevc");
    let archive = source(&emulator, "hevc")
        .playback(PlaybackMode::OnDemand {
            start: truth[1].producer_start,
            end: truth[4].producer_start,
        })
        .build()
        .unwrap();
    let frames = drain(&archive);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "hevc", 1..=4));
    assert_exact(&emulator, "hevc", &frames);
    // Live, in RGB through the SIMD converter.
    let live = source(&emulator, "hevc")
        .pixel_format(PixelFormat::Rgb)
        .build()
        .unwrap();
    let frames = take(&live, 30, Duration::from_secs(20));
    assert_eq!(frames.len(), 30);
    for f in &frames {
        assert_eq!(
            (f.width(), f.height(), f.format()),
            (320, 240, PixelFormat::Rgb)
        );
    }
    let times: Vec<_> = frames.iter().map(|f| f.producer_time().unwrap()).collect();
    assert!(times.windows(2).all(|w| w[1] > w[0]), "{times:?}");
    assert_eq!(live.stats().decode_errors, 0);
}

/// NTSC cameras run at 29.97 fps: a frame step of 33.3667 ms, not a whole number of
/// milliseconds, while KVS's fragment times (program date times) have millisecond precision.
/// Every frame's producer time comes from its fragment's program date time plus its offset on
/// the media timeline, so it is off by less than a millisecond, and that bound does not grow
/// from one fragment to the next (no accumulated rounded steps).
#[test]
fn ntsc_frame_rates_keep_producer_times_within_a_millisecond_without_drift() {
    let emulator = common::start(vec![
        common::small("ntsc")
            .frame_rate(FrameRate::NTSC)
            .fragment_duration(Duration::from_millis(1001))
            .history(Duration::from_secs(40)),
    ]);
    assert!(emulator.wait_for_fragments("ntsc", 39, Duration::from_secs(90)));
    let truth = emulator.ground_truth("ntsc");
    assert!(
        truth.iter().all(|r| r.frame_count == 30),
        "30 frames a fragment"
    );
    let source = source(&emulator, "ntsc")
        .playback(PlaybackMode::OnDemand {
            start: truth[1].producer_start,
            end: truth[38].producer_start,
        })
        .build()
        .unwrap();
    let frames = drain(&source);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "ntsc", 1..=38));
    let mut worst = Duration::ZERO;
    for (frame, n) in frames.iter().zip(&numbers) {
        let truth = emulator.frame_producer_time("ntsc", u64::from(*n)).unwrap();
        let got = frame.producer_time().unwrap();
        let error = got.duration_since(truth).unwrap_or_else(|e| e.duration());
        assert!(
            error < Duration::from_millis(1),
            "frame {n}: off by {error:?}"
        );
        worst = worst.max(error);
    }
    // Inside a fragment the steps are the exact 1001/30 ms of the media timeline.
    for pair in frames.windows(2).take(29) {
        let step = pair[1]
            .producer_time()
            .unwrap()
            .duration_since(pair[0].producer_time().unwrap())
            .unwrap();
        let exact = Duration::from_nanos(33_366_666);
        assert!(
            step.abs_diff(exact) < Duration::from_micros(2),
            "step {step:?}"
        );
    }
    // 38 fragments later the error is no larger than in the first one.
    let last = &frames[frames.len() - 30..];
    let first = &frames[..30];
    let err = |f: &Frame| {
        let truth = emulator
            .frame_producer_time("ntsc", u64::from(number(f)))
            .unwrap();
        let got = f.producer_time().unwrap();
        got.duration_since(truth).unwrap_or_else(|e| e.duration())
    };
    let max_last = last.iter().map(err).max().unwrap();
    let max_first = first.iter().map(err).max().unwrap();
    assert!(max_last < Duration::from_millis(1) && max_first < Duration::from_millis(1));
    assert!(worst < Duration::from_millis(1));
    // The decoder sees 29.97 fps.
    assert_eq!(source.stats().decode_errors, 0);
}

/// B-frames (composition offsets in `trun`), written both ways KVS might serve them: the key
/// frame shown 2+ frames after its decode time (positive offsets, as x264 makes them) or at it
/// (negative offsets, CMAF). Either way every frame comes out once, in presentation order,
/// with its exact producer time, from the archive and live.
#[test]
fn b_frames_decode_in_presentation_order_with_exact_producer_times() {
    for offsets in [CompositionOffsets::Positive, CompositionOffsets::Negative] {
        let name = format!("bframes-{offsets:?}").to_lowercase();
        let emulator = common::start(vec![
            common::small(&name)
                .b_frames(2, offsets)
                .history(Duration::from_secs(6)),
        ]);
        assert!(emulator.wait_for_fragments(&name, 6, Duration::from_secs(60)));
        let truth = emulator.ground_truth(&name);
        let archive = source(&emulator, &name)
            .playback(PlaybackMode::OnDemand {
                start: truth[1].producer_start,
                end: truth[4].producer_start,
            })
            .build()
            .unwrap();
        let frames = drain(&archive);
        let numbers: Vec<u32> = frames.iter().map(number).collect();
        assert_eq!(numbers, expected(&emulator, &name, 1..=4), "{offsets:?}");
        assert_exact(&emulator, &name, &frames);
        let live = source(&emulator, &name).build().unwrap();
        let frames = take(&live, 40, Duration::from_secs(20));
        assert_exact(&emulator, &name, &frames);
        assert_eq!(live.stats().decode_errors, 0, "{offsets:?}");
    }
}

/// A camera with a microphone: KVS serves AAC as track 2 in the same fMP4 fragments. The
/// reader decodes the video, every frame with its exact producer time, and ignores the audio
/// (it hands out frames, not sound); the audio track's decode times are moved in their own
/// 48 kHz timescale, so the demuxer sees both tracks on one timeline.
#[test]
fn a_stream_with_an_aac_track_delivers_every_video_frame_exactly() {
    let emulator = common::start(vec![
        common::small("av")
            .audio(true)
            .history(Duration::from_secs(6)),
    ]);
    assert!(emulator.wait_for_fragments("av", 6, Duration::from_secs(60)));
    let truth = emulator.ground_truth("av");
    let archive = source(&emulator, "av")
        .playback(PlaybackMode::OnDemand {
            start: truth[1].producer_start,
            end: truth[4].producer_start,
        })
        .build()
        .unwrap();
    let frames = drain(&archive);
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "av", 1..=4));
    assert_exact(&emulator, "av", &frames);
    let live = source(&emulator, "av")
        .pixel_format(PixelFormat::Bgr)
        .build()
        .unwrap();
    let frames = take(&live, 40, Duration::from_secs(20));
    assert_exact(&emulator, "av", &frames);
    let stats = live.stats();
    assert_eq!(
        (stats.decode_errors, stats.read_errors),
        (0, 0),
        "{stats:?}"
    );
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
    let registry = kvs_frames::prometheus::Registry::new();
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
fn letterbox_and_fit_keep_the_aspect_ratio_and_map_boxes_back() {
    // 320x240 (4:3) pictures into 320x180 (16:9): 240x180 of picture, 40 columns each side.
    let emulator = history("cam-1", 2);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[0].producer_start + Duration::from_millis(1),
    };
    let (left, top, side) = barcode::red_marker(320, 240);
    let marker = Rect::new(left as f64, top as f64, side as f64, side as f64);
    let blue = [0, 0, 255];
    let first = |format: PixelFormat, mode: ResizeMode| {
        let source = source(&emulator, "cam-1")
            .playback(range)
            .pixel_format(format)
            .resize(320, 180)
            .resize_mode(mode)
            .build()
            .unwrap();
        let frames = drain(&source);
        assert_eq!(frames.len(), 25, "{format} {mode:?}");
        frames.into_iter().next().unwrap()
    };
    // The pixel at the centre of `rect` (frame coordinates) of an RGB frame.
    let rgb_at = |f: &Frame, x: f64, y: f64| {
        let (x, y) = (x as usize, y as u32);
        f.row(y).unwrap()[x * 3..x * 3 + 3].to_vec()
    };
    let centre = |r: Rect| (r.x + r.width / 2.0, r.y + r.height / 2.0);

    let f = first(PixelFormat::Rgb, ResizeMode::Letterbox { color: blue });
    assert_eq!((f.width(), f.height()), (320, 180));
    let g = *f.geometry();
    assert_eq!((g.source_width, g.source_height), (320, 240));
    assert_eq!(
        (g.content_width, g.content_height, g.offset_x, g.offset_y),
        (240, 180, 40.0, 0.0)
    );
    for (x, y) in [(0.0, 0.0), (39.0, 90.0), (280.0, 90.0), (319.0, 179.0)] {
        assert_eq!(rgb_at(&f, x, y), blue, "padding at ({x}, {y})");
    }
    let (cx, cy) = centre(g.rect_from_source(marker));
    let px = rgb_at(&f, cx, cy);
    assert!(
        px[0] > 180 && px[1] < 90 && px[2] < 90,
        "the red marker maps to {px:?}"
    );
    // The picture's area maps back to the whole picture; the padding to nothing.
    assert_eq!(
        g.rect_to_source(Rect::new(40.0, 0.0, 240.0, 180.0)),
        Rect::new(0.0, 0.0, 320.0, 240.0)
    );
    assert_eq!(
        g.rect_to_source(Rect::new(0.0, 0.0, 40.0, 180.0)).width,
        0.0
    );

    let f = first(PixelFormat::Rgb, ResizeMode::Fit);
    assert_eq!(
        (f.width(), f.height()),
        (240, 180),
        "fit: the aspect ratio kept"
    );
    let g = *f.geometry();
    assert_eq!(
        (g.offset_x, g.offset_y, g.scale_x, g.scale_y),
        (0.0, 0.0, 0.75, 0.75)
    );
    let (cx, cy) = centre(g.rect_from_source(marker));
    let px = rgb_at(&f, cx, cy);
    assert!(
        px[0] > 180 && px[1] < 90 && px[2] < 90,
        "fit: the red marker maps to {px:?}"
    );

    let f = first(PixelFormat::Rgb, ResizeMode::Stretch);
    assert_eq!((f.width(), f.height()), (320, 180));
    assert_eq!((f.geometry().scale_x, f.geometry().scale_y), (1.0, 0.75));
    let (cx, cy) = centre(f.geometry().rect_from_source(marker));
    let px = rgb_at(&f, cx, cy);
    assert!(px[0] > 180 && px[1] < 90 && px[2] < 90, "stretch: {px:?}");

    // GRAY8 pads with the colour's luma; JPEG fits; without a resize the geometry is 1:1.
    let f = first(PixelFormat::Gray8, ResizeMode::Letterbox { color: blue });
    assert_eq!(f.row(90).unwrap()[0], 29, "BT.601 luma of pure blue");
    let f = first(PixelFormat::Jpeg { quality: 80 }, ResizeMode::Fit);
    assert_eq!((f.width(), f.height()), (240, 180));
    let plain = source(&emulator, "cam-1").playback(range).build().unwrap();
    let f = drain(&plain).into_iter().next().unwrap();
    assert_eq!(*f.geometry(), FrameGeometry::identity(320, 240));

    // Letterbox needs the SIMD converter's formats; a mode needs a size.
    for builder in [
        source(&emulator, "cam-1")
            .pixel_format(PixelFormat::I420)
            .resize(320, 180)
            .resize_mode(ResizeMode::Letterbox { color: blue }),
        source(&emulator, "cam-1").resize_mode(ResizeMode::Fit),
    ] {
        let err = builder.build().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert_eq!(err.invalid_option(), Some("resize_mode"), "{err}");
    }
}

#[test]
fn every_pixel_format_and_resize() {
    let emulator = history("cam-1", 2);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[0].producer_start + Duration::from_millis(1),
    };
    // 322 wide: rows of 1 and 3 bytes per pixel are padded to 4 bytes (stride ≠ width × bpp).
    let (w, h) = (322usize, 240usize);
    // The centre of the camera's red square (320x240 pictures), scaled to 322 columns.
    let (left, top, side) = barcode::red_marker(320, 240);
    let (cx, cy) = ((left + side / 2) * w / 320, top + side / 2);
    for format in PixelFormat::ALL {
        let source = source(&emulator, "cam-1")
            .playback(range)
            .pixel_format(format)
            .resize(w as u32, h as u32)
            .build()
            .unwrap();
        let frames = drain(&source);
        assert_eq!(frames.len(), 25, "{format}");
        let f = &frames[0];
        assert_eq!(
            (f.width(), f.height(), f.format()),
            (w as u32, h as u32, format)
        );
        match format.bytes_per_pixel() {
            Some(bpp) => {
                assert_eq!(f.n_planes(), 1);
                assert_eq!(f.stride(), (w * bpp).div_ceil(4) * 4, "{format}");
                if bpp != 4 {
                    assert_ne!(f.stride(), w * bpp, "{format}: padded rows");
                }
                assert_eq!(f.row(h as u32 - 1).unwrap().len(), w * bpp);
                let flat = f.to_contiguous();
                assert_eq!(flat.len(), w * h * bpp);
                let px = &f.row(cy as u32).unwrap()[cx * bpp..(cx + 1) * bpp];
                // The same pixel in the packed copy.
                assert_eq!(&flat[(cy * w + cx) * bpp..(cy * w + cx + 1) * bpp], px);
                let rgb = match format {
                    PixelFormat::Rgb | PixelFormat::Rgba => Some((px[0], px[1], px[2])),
                    PixelFormat::Bgr | PixelFormat::Bgra => Some((px[2], px[1], px[0])),
                    _ => None,
                };
                match rgb {
                    Some((r, g, b)) => {
                        assert!(r > 180 && g < 90 && b < 90, "{format}: red is {px:?}");
                    }
                    // GRAY8: the luma of red.
                    None => assert!((60..=110).contains(&px[0]), "{format}: {px:?}"),
                }
                if bpp == 4 {
                    assert_eq!(px[3], 255, "{format}: opaque");
                }
            }
            None => {
                let planes = if format == PixelFormat::I420 { 3 } else { 2 };
                assert_eq!(f.n_planes(), planes);
                let ys = f.plane_stride(0).unwrap();
                assert_eq!(f.plane(0).unwrap().len(), ys * h);
                let (u, v) = if format == PixelFormat::I420 {
                    let (us, vs) = (f.plane_stride(1).unwrap(), f.plane_stride(2).unwrap());
                    (
                        f.plane(1).unwrap()[cy / 2 * us + cx / 2],
                        f.plane(2).unwrap()[cy / 2 * vs + cx / 2],
                    )
                } else {
                    // NV12: U and V interleaved.
                    let uvs = f.plane_stride(1).unwrap();
                    let at = cy / 2 * uvs + cx / 2 * 2;
                    let uv = f.plane(1).unwrap();
                    (uv[at], uv[at + 1])
                };
                assert!(u < 120 && v > 200, "{format}: red has U {u}, V {v}");
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
        use kvs_emulator::{Failure, Request};
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
            !output.contains(kvs_emulator::SECRET_ACCESS_KEY),
            "secret leaked"
        );
    }
}

/// The value of a metric series `name{camera_id="…"}` in the registry's text output.
fn metric(registry: &kvs_frames::prometheus::Registry, series: &str) -> Option<f64> {
    let text = kvs_frames::metrics::encode_text(registry).unwrap();
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

/// `Emulator::start` returns with every camera playing: a source started at once connects on
/// its first request, with nothing counted as waiting, reconnecting or failing.
#[test]
fn a_source_started_right_after_the_emulator_connects_at_once() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(
        !emulator.ground_truth("cam-1").is_empty(),
        "start() returned before the first fragment"
    );
    let source = source(&emulator, "cam-1").build().unwrap();
    let frames = take(&source, 25, Duration::from_secs(10));
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert_eq!(
        (
            stats.reconnects,
            stats.read_errors,
            stats.waits_for_first_fragment
        ),
        (0, 0, 0),
        "{stats:?}"
    );
    assert_eq!(
        emulator.api_call_times("GetHLSStreamingSessionURL").len(),
        1
    );
}

/// "No fragments" on the first connection is a camera that has not started yet: one quiet
/// retry about a second later (INFO, not WARN), counted as waiting, not as a reconnect.
#[test]
fn no_fragments_on_the_first_connection_is_a_short_quiet_wait() {
    use kvs_emulator::{Failure, Request};
    let captured = Captured::default();
    let writer = captured.clone();
    tracing_subscriber::fmt()
        .with_env_filter("kvs_frames=info")
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .init();
    let emulator = common::start(vec![common::small("cam-1")]);
    emulator
        .faults("cam-1")
        .unwrap()
        .fail_next(Request::SessionUrl, Failure::NoFragments, 1);
    let source = source(&emulator, "cam-1")
        // A backoff far from 1 s: the wait must not be a backoff step.
        .backoff(
            BackoffPolicy::default()
                .initial(Duration::from_secs(5))
                .jitter(Jitter::Fixed(1.0)),
        )
        .build()
        .unwrap();
    let frames = take(&source, 25, Duration::from_secs(15));
    assert_exact(&emulator, "cam-1", &frames);
    let calls = emulator.api_call_times("GetHLSStreamingSessionURL");
    assert_eq!(calls.len(), 2, "one refused, one that played");
    let waited = calls[1] - calls[0];
    assert!(
        waited + Duration::from_millis(20) >= Duration::from_millis(800)
            && waited < Duration::from_millis(1200 + 750),
        "the retry came {waited:?} after the refused call"
    );
    let stats = source.stats();
    assert_eq!(stats.waits_for_first_fragment, 1, "{stats:?}");
    assert_eq!((stats.reconnects, stats.read_errors), (0, 0), "{stats:?}");
    assert!(stats.backoff_history.is_empty(), "{stats:?}");
    let logs = String::from_utf8(captured.0.lock().unwrap().clone()).unwrap();
    assert!(
        logs.contains("waiting for the camera's first fragment"),
        "{logs}"
    );
    assert!(
        !logs.contains(" WARN "),
        "no warning for a camera starting: {logs}"
    );
}

/// `wait_for_fragments_async` on a `current_thread` runtime, with an emulator that returned
/// before its camera's first fragment: the wait ends when it arrives, without blocking the
/// runtime (a timer ticking beside it keeps running).
#[test]
fn the_async_wait_for_fragments_runs_on_a_current_thread_runtime() {
    let emulator = common::start_cold(vec![common::small("cam-1")]);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    let ticks = std::cell::Cell::new(0u32);
    let ready = runtime.block_on(async {
        let ticker = async {
            loop {
                tokio::time::sleep(Duration::from_millis(50)).await;
                ticks.set(ticks.get() + 1);
            }
        };
        tokio::select! {
            ready = emulator.wait_for_fragments_async("cam-1", 2, Duration::from_secs(20)) => ready,
            _ = ticker => false,
        }
    });
    assert!(ready, "two fragments within 20 s");
    // Two 1 s fragments take about 2 s: a wait that blocked the thread would leave the ticker
    // at 0.
    assert!(
        ticks.get() >= 10,
        "the runtime was blocked: {} ticks",
        ticks.get()
    );
    assert!(emulator.ground_truth("cam-1").len() >= 2);
    // And a timeout is a plain false.
    let never = runtime.block_on(emulator.wait_for_fragments_async(
        "cam-1",
        1_000_000,
        Duration::from_millis(100),
    ));
    assert!(!never);
}

/// A reader at 10 fps of a 25 fps camera, with `Block` (the decoder waits for it): without
/// `max_frame_age` it falls further and further behind; with it every frame it gets was at most
/// that old when decoded, the rest are counted as too old, and old fragments are skipped.
#[test]
fn max_frame_age_keeps_a_slow_reader_at_the_live_edge() {
    let emulator = common::start(vec![common::small("cam-1")]);
    let max_age = Duration::from_millis(2500);
    let run = |age: Option<Duration>| {
        let mut builder = source(&emulator, "cam-1")
            .delivery(DeliveryPolicy::Block)
            .queue_capacity(2);
        if let Some(age) = age {
            builder = builder.max_frame_age(age);
        }
        let source = builder.build().unwrap();
        let mut frames = source.frames();
        let (mut decoded_ages, mut numbers) = (Vec::new(), Vec::new());
        let started = Instant::now();
        while started.elapsed() < Duration::from_secs(9) {
            let (frame, _) = frames
                .next_timeout(Duration::from_secs(10))
                .unwrap()
                .unwrap();
            let produced = frame.producer_time().unwrap();
            decoded_ages.push(
                frame
                    .emitted_at()
                    .duration_since(produced)
                    .unwrap_or_default(),
            );
            numbers.push(number(&frame));
            std::thread::sleep(Duration::from_millis(100));
        }
        (decoded_ages, numbers, source.stats())
    };

    let (ages, _, stats) = run(None);
    let oldest = ages.iter().max().copied().unwrap();
    assert!(
        oldest > max_age + Duration::from_secs(1),
        "without max_frame_age the slow reader falls behind: oldest {oldest:?}, {stats:?}"
    );
    assert_eq!(stats.frames_dropped_too_old, 0);

    let (ages, numbers, stats) = run(Some(max_age));
    let oldest = ages.iter().max().copied().unwrap();
    assert!(
        oldest <= max_age + Duration::from_millis(100),
        "a frame {oldest:?} old was delivered with max_frame_age {max_age:?}: {ages:?}"
    );
    assert!(
        numbers.windows(2).all(|w| w[1] > w[0]),
        "in order, none twice: {numbers:?}"
    );
    assert!(stats.frames_dropped_too_old > 0, "{stats:?}");
    assert_eq!(stats.frames_dropped_queue_full, 0, "{stats:?}");
    assert_eq!(stats.frames_dropped(), stats.frames_dropped_too_old);
    assert_eq!((stats.reconnects, stats.read_errors), (0, 0), "{stats:?}");
    // The decoded frames are delivered or dropped: none vanish.
    let (min, max) = (numbers[0], *numbers.last().unwrap());
    let span = u64::from(max - min) + 1;
    assert!(
        stats.frames_delivered + stats.frames_dropped_too_old + 60 >= span,
        "{span} frames from {min} to {max}, {stats:?}"
    );
}

/// After an outage of the reader's side (every HLS request fails for 8 s), the playlist holds
/// the fragments it missed. With `max_frame_age` those that ended too long ago are not fetched:
/// the reader goes on at the live edge; without it, it reads through them (nothing lost).
#[test]
fn after_an_outage_max_frame_age_skips_the_backlog() {
    let emulator = common::start(vec![common::small("cam-1")]);
    let run = |age: Option<Duration>| {
        let mut builder = source(&emulator, "cam-1").backoff(quick_backoff());
        if let Some(age) = age {
            builder = builder.max_frame_age(age);
        }
        let source = builder.build().unwrap();
        let mut frames = source.frames();
        for _ in 0..10 {
            frames
                .next_timeout(Duration::from_secs(20))
                .unwrap()
                .unwrap();
        }
        let before = source.stats().reconnects;
        emulator
            .faults("cam-1")
            .unwrap()
            .server_errors(Duration::from_secs(8));
        // Read on: the first frame after the reconnect, and how old it was when decoded.
        let first_after = loop {
            let (frame, _) = frames
                .next_timeout(Duration::from_secs(30))
                .unwrap()
                .unwrap();
            if source.stats().reconnects > before {
                break frame;
            }
        };
        let age = first_after
            .emitted_at()
            .duration_since(first_after.producer_time().unwrap())
            .unwrap_or_default();
        (age, source.stats())
    };
    let max_age = Duration::from_secs(2);
    let (age, stats) = run(Some(max_age));
    assert!(stats.fragments_too_old >= 3, "{stats:?}");
    assert!(
        age <= max_age + Duration::from_millis(100),
        "after the outage: a frame {age:?} old"
    );
    let (age, stats) = run(None);
    assert_eq!(stats.fragments_too_old, 0, "{stats:?}");
    assert!(
        age > Duration::from_secs(4),
        "without max_frame_age the backlog is read: {age:?}"
    );
}

#[test]
fn max_frame_age_is_for_live_playback_only() {
    let emulator = common::start(vec![common::small("cam-1")]);
    let now = SystemTime::now();
    let err = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: now - Duration::from_secs(60),
            end: now,
        })
        .max_frame_age(Duration::from_secs(3))
        .build()
        .unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert!(err.to_string().contains("max_frame_age"), "{err}");
    for bad in [Duration::from_millis(99), Duration::from_secs(3601)] {
        let err = source(&emulator, "cam-1")
            .max_frame_age(bad)
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("max_frame_age"), "{err}");
    }
}

#[test]
fn a_live_source_never_gives_up_on_a_long_outage_by_default() {
    let emulator = common::start_cold(vec![common::small("cam-1")]);
    let faults = emulator.faults("cam-1").unwrap();
    faults.camera_offline(Duration::from_secs(3600));
    assert!(
        emulator.ground_truth("cam-1").is_empty(),
        "the camera is offline from the start"
    );
    let registry = kvs_frames::prometheus::Registry::new();
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
            let before = source.stats();
            source.stop();
            assert_eq!(
                source.state(),
                SourceState::Disconnected,
                "{what}: {before:?}"
            );
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
    use kvs_emulator::{Failure, Request};
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
        |s| s.stats().queue_len >= 1 && s.stats().fragments_fetched >= 2,
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
        |s| s.stats().fragments_fetched >= 2 && s.stats().queue_len >= 1,
    );

    // The end of a range whose last fragment fails to decode: the decoder never sees
    // end-of-stream (the wait for it must not hang stop).
    let last_fails = PlaybackMode::OnDemand {
        start: truth[1].producer_start,
        end: truth[2].producer_start,
    };
    assert_stops_fast(
        "after a decode failure",
        || {
            emulator.faults("archive").unwrap().fail_nth(
                Request::MediaFragment,
                2,
                Failure::Corrupt,
            );
            let s = source(&emulator, "archive")
                .playback(last_fails)
                .build()
                .unwrap();
            let deadline = Instant::now() + Duration::from_secs(20);
            while s.stats().fragments_fetched < 2 {
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
    use kvs_emulator::{Failure, Request};
    let emulator = history("cam-1", 4);
    let truth = emulator.ground_truth("cam-1");
    // The range's last fragment fails to decode, while the source waits for the decoder to
    // flush.
    emulator
        .faults("cam-1")
        .unwrap()
        .fail_nth(Request::MediaFragment, 2, Failure::Corrupt);
    let source = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[1].producer_start,
            end: truth[2].producer_start,
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
    // The first fragment's frames, but for those still inside the decoder when it failed.
    let numbers: Vec<u32> = frames.iter().map(number).collect();
    let first = expected(&emulator, "cam-1", 1..=1);
    assert!(
        !numbers.is_empty() && first.starts_with(&numbers),
        "{numbers:?}"
    );
    let stats = source.stats();
    assert_eq!(stats.state, SourceState::Disconnected, "{stats:?}");
    assert_eq!(stats.decode_errors, 1, "{stats:?}");
    assert!(stats.last_error.is_some(), "{stats:?}");
}

/// Every counter of the registry's `kvs_hls_*` series for `camera` equals its stats field.
fn assert_metrics_match_stats(
    registry: &kvs_frames::prometheus::Registry,
    camera: &str,
    stats: &kvs_frames::SourceStats,
) {
    let series = |name: &str| {
        metric(registry, &format!("{name}{{camera_id=\"{camera}\"}}"))
            .unwrap_or_else(|| panic!("{name} missing"))
    };
    let pairs = [
        ("kvs_hls_frames_total", stats.frames_delivered),
        ("kvs_hls_reconnects_total", stats.reconnects),
        ("kvs_hls_url_refreshes_total", stats.url_refreshes),
        ("kvs_hls_read_errors_total", stats.read_errors),
        ("kvs_hls_fragments_total", stats.fragments_fetched),
        ("kvs_hls_fragments_skipped_total", stats.fragments_skipped),
        ("kvs_hls_clock_steps_total", stats.clock_steps),
        ("kvs_hls_sessions_lost_total", stats.sessions_lost),
    ];
    for (name, value) in pairs {
        assert_eq!(series(name), value as f64, "{name}: {stats:?}");
    }
    let dropped = metric(
        registry,
        &format!("kvs_hls_frames_dropped_total{{camera_id=\"{camera}\",reason=\"queue_full\"}}"),
    );
    assert_eq!(dropped, Some(stats.frames_dropped_queue_full as f64));
    assert_eq!(series("kvs_hls_connection_state"), stats.state as u8 as f64);
}

/// Takes frames until `done` holds (each within `timeout`), at most 40 s.
fn take_until(
    source: &KvsHlsFrameSource,
    frames: &mut Vec<Frame>,
    done: impl Fn(&kvs_frames::SourceStats) -> bool,
) {
    let deadline = Instant::now() + Duration::from_secs(40);
    while !done(&source.stats()) {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        frames.extend(take(source, 5, Duration::from_secs(15)));
    }
}

#[test]
fn a_failed_request_is_recovered_inside_the_session() {
    use kvs_emulator::{Failure, Request};
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let registry = kvs_frames::prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .backoff(quick_backoff())
        .metrics(metrics)
        .build()
        .unwrap();
    let faults = emulator.faults("cam-1").unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    // One failure of one request each: retried at once, in the session.
    let one_shots = [
        (Request::MediaFragment, Failure::ServerError),
        (Request::MediaFragment, Failure::Reset),
        (Request::MediaFragment, Failure::Throttled),
        (Request::MediaPlaylist, Failure::ServerError),
        (Request::MediaPlaylist, Failure::Throttled),
        (Request::MediaPlaylist, Failure::Reset),
    ];
    for (i, (request, failure)) in one_shots.into_iter().enumerate() {
        faults.fail_next(request, failure, 1);
        take_until(&source, &mut frames, |s| s.read_errors == i as u64 + 1);
    }
    frames.extend(take(&source, 25, Duration::from_secs(10)));
    let stats = source.stats();
    assert_eq!(
        (stats.reconnects, stats.sessions, stats.url_refreshes),
        (0, 1, 0),
        "{stats:?}"
    );
    assert_eq!(stats.read_errors, 6, "{stats:?}");

    // A 403 on one fragment GET: the session is refreshed in place and the fragment fetched
    // from the new one.
    faults.fail_next(Request::MediaFragment, Failure::Forbidden, 1);
    take_until(&source, &mut frames, |s| s.url_refreshes == 1);
    // The new session's init segment fails once too: retried.
    faults.fail_next(Request::InitSegment, Failure::ServerError, 1);
    faults.revoke_sessions();
    take_until(&source, &mut frames, |s| {
        s.url_refreshes == 2 && s.read_errors == 7
    });
    frames.extend(take(&source, 25, Duration::from_secs(10)));
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert_eq!(
        (stats.reconnects, stats.sessions, stats.sessions_lost),
        (0, 3, 2),
        "{stats:?}"
    );
    assert_eq!((stats.fragments_skipped, stats.pipelines_built), (0, 1));

    // A fragment that fails to decode: the decode branch is rebuilt, the session kept.
    faults.fail_next(Request::MediaFragment, Failure::Corrupt, 1);
    let mut after = Vec::new();
    take_until(&source, &mut after, |s| s.decode_errors == 1);
    after.extend(take(&source, 50, Duration::from_secs(15)));
    let stats = source.stats();
    assert_eq!(stats.pipelines_built, 2, "{stats:?}");
    assert_eq!((stats.reconnects, stats.sessions), (0, 3), "{stats:?}");
    // Only the frames of the broken fragment (and at most one more in the failed pipeline) are
    // lost; order and producer times stay right.
    let numbers: Vec<u32> = after.iter().map(number).collect();
    let gaps: Vec<u32> = numbers.windows(2).map(|w| w[1] - w[0] - 1).collect();
    let lost: u32 = gaps.iter().sum::<u32>() + numbers[0] - number(frames.last().unwrap()) - 1;
    assert!((25..=50).contains(&lost), "{lost} frames lost: {numbers:?}");
    assert!(numbers.windows(2).all(|w| w[1] > w[0]));
    for f in &after {
        assert_eq!(
            f.producer_time(),
            emulator.frame_producer_time("cam-1", u64::from(number(f)))
        );
    }
    // Counters are compared once nothing moves any more.
    source.stop();
    assert_metrics_match_stats(&registry, "test-camera", &source.stats());
}

#[test]
fn fragments_that_leave_the_live_window_are_counted_and_ordinary_outages_lose_none() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let registry = kvs_frames::prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    let build = |id: &str, window: Option<u32>| {
        let mut b = KvsHlsFrameSource::builder(id, "cam-1")
            .sdk_config(&emulator.sdk_config())
            .pixel_format(PixelFormat::Gray8)
            .delivery(DeliveryPolicy::Block)
            .backoff(quick_backoff())
            .metrics(metrics.clone());
        if let Some(n) = window {
            b = b.max_playlist_fragments(n);
        }
        b.build().unwrap()
    };
    let default_window = build("default", None);
    let small_window = build("small", Some(3));
    let mut frames = (
        take(&default_window, 25, Duration::from_secs(10)),
        take(&small_window, 25, Duration::from_secs(10)),
    );
    // 7 s without any HLS request served: longer than the 3-fragment window (3 s), far shorter
    // than the default one (30 fragments).
    emulator
        .faults("cam-1")
        .unwrap()
        .throttle(Duration::from_secs(7));
    std::thread::scope(|s| {
        let a = s.spawn(|| take(&default_window, 300, Duration::from_secs(20)));
        let b = s.spawn(|| take(&small_window, 300, Duration::from_secs(20)));
        frames.0.extend(a.join().unwrap());
        frames.1.extend(b.join().unwrap());
    });
    assert_exact(&emulator, "cam-1", &frames.0);
    let stats = default_window.stats();
    assert_eq!(stats.fragments_skipped, 0, "{stats:?}");
    assert!(stats.reconnects >= 1, "{stats:?}");
    assert_eq!(stats.sessions, 1, "throttling keeps the session: {stats:?}");
    // The small window lost whole fragments, exactly as many as counted.
    let numbers: Vec<u32> = frames.1.iter().map(number).collect();
    let missing: u32 = numbers.windows(2).map(|w| w[1] - w[0] - 1).sum();
    assert!(numbers.windows(2).all(|w| w[1] > w[0]));
    let stats = small_window.stats();
    assert!(missing > 0, "{stats:?}");
    assert_eq!(
        u64::from(missing),
        stats.fragments_skipped * 25,
        "{stats:?}"
    );
    assert_eq!(stats.sessions, 1, "{stats:?}");
    // Counters are compared once nothing moves any more.
    small_window.stop();
    default_window.stop();
    assert_metrics_match_stats(&registry, "small", &small_window.stats());
    assert_metrics_match_stats(&registry, "default", &default_window.stats());
}

#[test]
fn producer_clock_steps_neither_skip_nor_repeat_frames() {
    use kvs_emulator::ClockShift;
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let registry = kvs_frames::prometheus::Registry::new();
    let metrics = kvs_frames::metrics::FrameSourceMetrics::register(&registry).unwrap();
    // A new session every 3 s, so that sessions change during the steps too.
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .expires(Duration::from_secs(300))
        .refresh_margin(Duration::from_secs(297))
        .metrics(metrics)
        .build()
        .unwrap();
    let faults = emulator.faults("cam-1").unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    for shift in [
        ClockShift::Behind(Duration::from_secs(120)),
        ClockShift::Ahead(Duration::from_secs(120)),
    ] {
        faults.shift_producer_timestamps(shift, Duration::from_secs(4));
        frames.extend(take(&source, 200, Duration::from_secs(15)));
    }
    frames.extend(take(&source, 50, Duration::from_secs(15)));
    // Every frame once, in order, with the (stepped) producer time the camera gave it.
    assert_exact(&emulator, "cam-1", &frames);
    let truth = emulator.ground_truth("cam-1");
    let stepped = frames
        .iter()
        .filter(|f| {
            let t = f.producer_time().unwrap();
            truth
                .iter()
                .any(|r| r.server_start > t + Duration::from_secs(100) && r.producer_start <= t)
        })
        .count();
    assert!(stepped >= 50, "frames with a stepped-back clock: {stepped}");
    let stats = source.stats();
    // Back, forward again; forward, back again.
    assert_eq!(stats.clock_steps, 4, "{stats:?}");
    assert_eq!(
        (stats.fragments_skipped, stats.reconnects),
        (0, 0),
        "{stats:?}"
    );
    assert!(stats.url_refreshes >= 3, "{stats:?}");
    assert_eq!(stats.pipelines_built, 1);
    source.stop();
    assert_metrics_match_stats(&registry, "test-camera", &source.stats());
}

#[test]
fn on_demand_with_one_fragment_per_playlist_advances_one_session_per_fragment() {
    let emulator = history("cam-1", 6);
    let truth = emulator.ground_truth("cam-1");
    let source = source(&emulator, "cam-1")
        .playback(PlaybackMode::OnDemand {
            start: truth[0].producer_start,
            end: truth[4].producer_start,
        })
        .max_playlist_fragments(1)
        .build()
        .unwrap();
    let numbers: Vec<u32> = drain(&source).iter().map(number).collect();
    assert_eq!(numbers, expected(&emulator, "cam-1", 0..=4));
    let stats = source.stats();
    assert_eq!(stats.sessions, 5, "one session per fragment: {stats:?}");
    assert_eq!(
        emulator.api_call_times("GetHLSStreamingSessionURL").len(),
        5,
        "{stats:?}"
    );
    assert_eq!(stats.read_errors, 0, "{stats:?}");
}

#[test]
fn get_data_endpoint_is_called_again_only_when_the_endpoint_may_be_stale() {
    let emulator = common::start_cold(vec![common::small("cam-1")]);
    let faults = emulator.faults("cam-1").unwrap();
    faults.camera_offline(Duration::from_secs(3600));
    assert!(emulator.ground_truth("cam-1").is_empty());
    let source = source(&emulator, "cam-1")
        .backoff(quick_backoff())
        .build()
        .unwrap();
    let endpoint_calls = || {
        emulator
            .request_stats()
            .api_calls
            .get("GetDataEndpoint")
            .copied()
            .unwrap_or(0)
    };
    // "No fragments", again and again: the endpoint stays.
    let deadline = Instant::now() + Duration::from_secs(30);
    while source.stats().consecutive_errors < 5 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(endpoint_calls(), 1, "{:?}", source.stats());
    faults.camera_offline(Duration::ZERO);
    take(&source, 25, Duration::from_secs(15));
    // Throttling: the endpoint stays.
    faults.throttle(Duration::from_secs(4));
    let reconnects = source.stats().reconnects;
    take_until(&source, &mut Vec::new(), |s| s.reconnects > reconnects);
    take(&source, 50, Duration::from_secs(15));
    assert_eq!(endpoint_calls(), 1, "{:?}", source.stats());
    // 5xx beyond the quick retries: the endpoint may be stale, so it is asked for again.
    faults.server_errors(Duration::from_secs(4));
    let reconnects = source.stats().reconnects;
    take_until(&source, &mut Vec::new(), |s| s.reconnects > reconnects);
    take(&source, 25, Duration::from_secs(15));
    assert!(endpoint_calls() >= 2, "{:?}", source.stats());
}

#[test]
fn a_session_closed_by_another_reader_is_replaced_and_counted() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .build()
        .unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    // Five other readers of the camera open a session each: the sixth session of the stream
    // closes the oldest, this reader's.
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let media = common::media(&emulator, "cam-1").await;
        for _ in 0..5 {
            common::session(&media, "cam-1", &common::SessionParams::default())
                .await
                .unwrap();
        }
    });
    assert!(emulator.request_stats().sessions_closed >= 1);
    take_until(&source, &mut frames, |s| s.sessions_lost == 1);
    frames.extend(take(&source, 50, Duration::from_secs(10)));
    assert_exact(&emulator, "cam-1", &frames);
    let stats = source.stats();
    assert_eq!(
        (stats.sessions, stats.url_refreshes, stats.reconnects),
        (2, 1, 0),
        "{stats:?}"
    );
}

#[test]
fn backoff_delays_measured_end_to_end_follow_the_seeded_policy() {
    let emulator = common::start_cold(vec![common::small("cam-1")]);
    emulator
        .faults("cam-1")
        .unwrap()
        .camera_offline(Duration::from_secs(3600));
    assert!(emulator.ground_truth("cam-1").is_empty());
    let policy = || {
        BackoffPolicy::default()
            .initial(Duration::from_millis(600))
            .multiplier(2.0)
            .max(Duration::from_millis(2400))
            .jitter(Jitter::seeded(0.8, 1.2, 20_261_202))
    };
    // The delays an identically seeded policy draws, in order.
    let reference = policy();
    let expected: Vec<Duration> = (1..=6).map(|n| reference.delay(n)).collect();
    let source = source(&emulator, "cam-1")
        .backoff(policy())
        .build()
        .unwrap();
    // No session can be opened (no fragments): every attempt is a GetHLSStreamingSessionURL.
    let deadline = Instant::now() + Duration::from_secs(60);
    while emulator.api_call_times("GetHLSStreamingSessionURL").len() < 8 {
        assert!(Instant::now() < deadline, "{:?}", source.stats());
        std::thread::sleep(Duration::from_millis(50));
    }
    let calls = emulator.api_call_times("GetHLSStreamingSessionURL");
    // The first retry is the wait for a camera's first fragment (1 s × 0.8–1.2), not a backoff
    // step; the policy's delays follow it.
    let first = calls[1] - calls[0];
    assert!(
        first + Duration::from_millis(20) >= Duration::from_millis(800)
            && first < Duration::from_millis(1200 + 750),
        "the first retry came {first:?} after the first call"
    );
    let mut factors = Vec::new();
    for (i, (pair, want)) in calls[1..].windows(2).zip(&expected).enumerate() {
        let measured = pair[1] - pair[0];
        // The delay, then one request to the emulator on 127.0.0.1 (generous for a loaded
        // machine), never less than the delay.
        assert!(
            measured + Duration::from_millis(20) >= *want
                && measured < *want + Duration::from_millis(750),
            "attempt {}: {measured:?} after the previous one, the policy says {want:?}",
            i + 2
        );
        let base = Duration::from_millis(600 * (1 << i)).min(Duration::from_millis(2400));
        let factor = want.as_secs_f64() / base.as_secs_f64();
        assert!((0.8..=1.2).contains(&factor), "jitter {factor}");
        factors.push(factor);
    }
    assert!(
        factors.windows(2).any(|w| w[0] != w[1]),
        "jittered: {factors:?}"
    );
    let stats = source.stats();
    assert_eq!(&stats.backoff_history[..6], &expected[..], "{stats:?}");
    assert_eq!(stats.state, SourceState::Reconnecting);
    assert_eq!(stats.waits_for_first_fragment, 1, "{stats:?}");
}

#[test]
fn drop_oldest_keeps_the_newest_frames_and_counts_every_other() {
    let emulator = history("cam-1", 5);
    let truth = emulator.ground_truth("cam-1");
    let range = PlaybackMode::OnDemand {
        start: truth[0].producer_start,
        end: truth[3].producer_start,
    };
    let all = expected(&emulator, "cam-1", 0..=3);
    for (policy, capacity) in [
        (DeliveryPolicy::DropOldest, 5),
        (DeliveryPolicy::LatestOnly, 1),
    ] {
        let source = source(&emulator, "cam-1")
            .playback(range)
            .delivery(policy)
            .queue_capacity(5)
            .build()
            .unwrap();
        let mut frames = source.frames();
        let mut got: Vec<u32> = Vec::new();
        for _ in 0..10 {
            let (frame, _) = frames
                .next_timeout(Duration::from_secs(15))
                .unwrap()
                .unwrap();
            got.push(number(&frame));
        }
        // The reader pauses until the whole range is decoded (the decoder never waits): every
        // frame is then delivered, dropped or queued.
        let deadline = Instant::now() + Duration::from_secs(30);
        let accounted = |s: kvs_frames::SourceStats| {
            s.frames_delivered + s.frames_dropped_queue_full + s.queue_len as u64
        };
        while accounted(source.stats()) < all.len() as u64 {
            assert!(
                Instant::now() < deadline,
                "{policy:?}: {:?}",
                source.stats()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        // The queue holds the newest `capacity` frames: the next frame is the newest decoded
        // minus (capacity − 1), then the rest, then the end.
        let queued = source.stats().queue_len;
        assert_eq!(queued, capacity, "{policy:?}");
        let rest = common::frames::drain_frames(frames, Duration::from_secs(15), || source.stats());
        let rest: Vec<u32> = rest.iter().map(number).collect();
        assert_eq!(rest, all[all.len() - capacity..], "{policy:?}");
        got.extend(&rest);
        assert!(got.windows(2).all(|w| w[1] > w[0]), "{policy:?}: {got:?}");
        // Every decoded frame was either delivered to the reader or counted as dropped.
        let stats = source.stats();
        assert_eq!(
            got.len() as u64 + stats.frames_dropped_queue_full,
            all.len() as u64,
            "{policy:?}: {stats:?}"
        );
        assert_eq!(
            stats.frames_delivered,
            got.len() as u64,
            "delivered = taken"
        );
    }
}

/// Version-0 `tfdt` fragments (32-bit decode times) and a producer clock 14 h ahead: the
/// reader's timeline passes 2^32 ticks at 90 kHz (13.25 h), so rebasing must rewrite the
/// fragments' `tfdt` as version 1; the real demuxer and decoder then give every frame, before,
/// during and after the step, its camera's producer time, none lost or repeated.
#[test]
fn version_0_fragments_decode_past_the_32_bit_timeline() {
    use kvs_emulator::ClockShift;
    let emulator = common::start(vec![common::small("cam-1").tfdt_version_0(true)]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    // What the emulator serves is version 0 (tfdt's version byte, after moof/mfhd/traf/tfhd).
    let runtime = tokio::runtime::Runtime::new().unwrap();
    let served = runtime.block_on(async {
        let media = common::media(&emulator, "cam-1").await;
        let url = common::session(&media, "cam-1", &common::SessionParams::default())
            .await
            .unwrap();
        let playlist_url = common::media_playlist_url(&url).await;
        let text = common::get(&playlist_url).await.unwrap().body;
        let playlist = common::parse_media(&String::from_utf8(text).unwrap());
        let uri = &playlist.segments.last().unwrap().uri;
        common::get(&common::resolve(&playlist_url, uri))
            .await
            .unwrap()
            .body
    });
    assert_eq!(&served[52..56], b"tfdt");
    assert_eq!(served[56], 0, "version 0 served");

    let source = source(&emulator, "cam-1")
        .delivery(DeliveryPolicy::Block)
        .build()
        .unwrap();
    let mut frames = take(&source, 25, Duration::from_secs(10));
    let step = Duration::from_secs(14 * 3600);
    emulator
        .faults("cam-1")
        .unwrap()
        .shift_producer_timestamps(ClockShift::Ahead(step), Duration::from_secs(4));
    frames.extend(take(&source, 200, Duration::from_secs(15)));
    frames.extend(take(&source, 50, Duration::from_secs(15)));
    assert_exact(&emulator, "cam-1", &frames);
    let first = frames[0].producer_time().unwrap();
    let ahead = frames
        .iter()
        .filter(|f| f.producer_time().unwrap() > first + step)
        .count();
    assert!(ahead >= 50, "frames with the clock 14 h ahead: {ahead}");
    let stats = source.stats();
    assert_eq!(stats.clock_steps, 2, "forward, and back again: {stats:?}");
    assert_eq!(
        (
            stats.decode_errors,
            stats.fragments_skipped,
            stats.pipelines_built
        ),
        (0, 0, 1),
        "{stats:?}"
    );
}

/// MPEG-TS sessions: H.264, H.265 and H.264 with B-frames, every frame once and in order at its
/// producer time; and across a camera outage (a gap in the timeline) the times stay exact.
#[test]
fn mpeg_ts_sessions_deliver_every_frame_with_exact_producer_times() {
    let emulator = common::start(vec![
        common::small("ts-264"),
        common::small("ts-265").codec(VideoCodec::H265),
        common::small("ts-b").b_frames(2, CompositionOffsets::Positive),
    ]);
    for stream in ["ts-264", "ts-265", "ts-b"] {
        let source = source(&emulator, stream)
            .container(kvs_frames::source::Container::MpegTs)
            .build()
            .unwrap();
        let frames = take(&source, 50, Duration::from_secs(15));
        assert_exact(&emulator, stream, &frames);
        source.stop();
    }
    // A 3 s outage of the camera: the fragments after it carry later program date times.
    let source = source(&emulator, "ts-264")
        .container(kvs_frames::source::Container::MpegTs)
        .build()
        .unwrap();
    let before = take(&source, 10, Duration::from_secs(15));
    emulator
        .faults("ts-264")
        .unwrap()
        .camera_offline(Duration::from_secs(3));
    let mut after = take(&source, 80, Duration::from_secs(20));
    let mut all = before;
    all.append(&mut after);
    let numbers: Vec<u32> = all.iter().map(number).collect();
    let gap = numbers
        .windows(2)
        .position(|p| p[1] != p[0] + 1)
        .expect("the outage shows as a gap in frame numbers");
    assert!(numbers[gap + 1] >= numbers[gap] + 50, "{numbers:?}");
    for (frame, n) in all.iter().zip(&numbers) {
        assert_eq!(
            frame.producer_time(),
            emulator.frame_producer_time("ts-264", u64::from(*n)),
            "producer time of frame {n}"
        );
    }
}

/// A stream whose audio is a separate HLS rendition: the reader follows the video variant and
/// delivers every frame at its producer time.
#[test]
fn a_separate_audio_rendition_leaves_the_video_exact() {
    let emulator = common::start(vec![
        common::small("sep").audio_layout(kvs_emulator::AudioLayout::SeparateRendition),
    ]);
    let source = source(&emulator, "sep").build().unwrap();
    let frames = take(&source, 50, Duration::from_secs(15));
    assert_exact(&emulator, "sep", &frames);
}

/// Combinations: H.265 with audio at 30 fps, H.264 with B-frames and audio at 15 fps, 29.97 fps
/// with audio over MPEG-TS: every frame once, in order, within a millisecond of its producer
/// time.
#[test]
fn combinations_of_codecs_rates_audio_and_containers_stay_exact() {
    let emulator = common::start(vec![
        common::small("c-265-30")
            .codec(VideoCodec::H265)
            .fps(30)
            .audio(true),
        common::small("c-b-15")
            .b_frames(2, CompositionOffsets::Positive)
            .fps(15)
            .audio(true),
        common::small("c-ntsc-ts")
            .frame_rate(FrameRate::NTSC)
            .fragment_duration(Duration::from_millis(1001))
            .audio(true),
    ]);
    for (stream, container) in [
        ("c-265-30", kvs_frames::source::Container::FragmentedMp4),
        ("c-b-15", kvs_frames::source::Container::FragmentedMp4),
        ("c-ntsc-ts", kvs_frames::source::Container::MpegTs),
    ] {
        let source = source(&emulator, stream)
            .container(container)
            .build()
            .unwrap();
        let frames = take(&source, 45, Duration::from_secs(15));
        let numbers: Vec<u32> = frames.iter().map(number).collect();
        for pair in numbers.windows(2) {
            assert_eq!(pair[1], pair[0] + 1, "{stream}: {numbers:?}");
        }
        for (frame, n) in frames.iter().zip(&numbers) {
            let truth = emulator.frame_producer_time(stream, u64::from(*n)).unwrap();
            let got = frame.producer_time().unwrap();
            let error = got.duration_since(truth).unwrap_or_else(|e| e.duration());
            assert!(
                error < Duration::from_millis(1),
                "{stream} frame {n}: off by {error:?}"
            );
        }
        source.stop();
    }
}
