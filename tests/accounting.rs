//! Every frame accounted for, and the metrics equal to the stats:
//!
//! * `DropOldest` after a reader pause: the queue holds exactly the newest `capacity` frames
//!   decoded, every other frame is counted as dropped, `delivered + dropped = decoded`;
//! * after faults (5xx, revoked sessions, a corrupt fragment, a cut download), every
//!   `kvs_hls_*` counter equals the matching field of `stats()`.
#![cfg(feature = "emulator")]

mod common;

use std::time::{Duration, Instant};

use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::emulator::{Emulator, Failure, Request, barcode};
use kvs_frames::metrics::FrameSourceMetrics;
use kvs_frames::{DeliveryPolicy, Frame, KvsHlsFrameSource, PixelFormat, PlaybackMode};

fn number(frame: &Frame) -> u64 {
    u64::from(
        barcode::read_gray8(
            frame.data(),
            frame.stride(),
            frame.width() as usize,
            frame.height() as usize,
        )
        .expect("a readable barcode"),
    )
}

fn history(name: &str, seconds: u64) -> Emulator {
    let emulator = common::start(vec![
        common::small(name).history(Duration::from_secs(seconds)),
    ]);
    assert!(emulator.wait_for_fragments(name, seconds as usize, Duration::from_secs(30)));
    emulator
}

#[test]
fn drop_oldest_keeps_the_newest_frames_and_counts_every_other() {
    let emulator = history("cam-1", 5);
    let truth = emulator.ground_truth("cam-1");
    // Fragments 1..=3 (the end is the start of fragment 3: KVS includes that fragment).
    let range = PlaybackMode::OnDemand {
        start: truth[1].producer_start,
        end: truth[3].producer_start,
    };
    let first = truth[1].first_frame;
    let last = truth[3].first_frame + u64::from(truth[3].frame_count) - 1;
    let total = last - first + 1;
    const CAPACITY: usize = 5;
    let source = KvsHlsFrameSource::builder("drops", "cam-1")
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Gray8)
        .playback(range)
        .delivery(DeliveryPolicy::DropOldest)
        .queue_capacity(CAPACITY)
        .build()
        .unwrap();
    let mut frames = source.frames();
    let before: Vec<u64> = (0..3)
        .map(|_| number(&frames.next().unwrap().unwrap().0))
        .collect();
    assert_eq!(before, [first, first + 1, first + 2]);

    // The reader pauses until the whole range is decoded (an event, not a sleep: the stats
    // account for every frame once it is either queued or dropped).
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let s = source.stats();
        let accounted = s.frames_delivered + s.frames_dropped_queue_full + s.queue_len as u64;
        if accounted == total {
            break;
        }
        assert!(accounted < total, "more frames than the range holds: {s:?}");
        assert!(
            Instant::now() < deadline,
            "the range was not decoded: {s:?}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let after: Vec<u64> = frames.map(|item| number(&item.unwrap().0)).collect();
    let newest: Vec<u64> = (last + 1 - CAPACITY as u64..=last).collect();
    assert_eq!(after, newest, "the queue held the newest {CAPACITY} frames");
    let stats = source.stats();
    assert_eq!(stats.frames_delivered, 3 + CAPACITY as u64, "{stats:?}");
    assert_eq!(
        stats.frames_delivered + stats.frames_dropped_queue_full,
        total,
        "delivered + dropped = decoded: {stats:?}"
    );
}

/// The value of series `name{labels}` in the registry's text output.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(series) && l[series.len()..].starts_with(' '))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no series {series} in\n{text}"))
}

#[test]
fn after_faults_every_counter_equals_its_stats_field() {
    let emulator = common::start(vec![common::small("cam-1")]);
    assert!(emulator.wait_for_fragments("cam-1", 1, Duration::from_secs(10)));
    let registry = prometheus::Registry::new();
    let source = KvsHlsFrameSource::builder("acct", "cam-1")
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Gray8)
        .request_timeout(Duration::from_secs(3))
        .metrics(FrameSourceMetrics::register(&registry).unwrap())
        .target_fps(10.0)
        .backoff(
            BackoffPolicy::default()
                .initial(Duration::from_millis(300))
                .max(Duration::from_secs(1))
                .jitter(Jitter::Fixed(1.0)),
        )
        .build()
        .unwrap();
    let take = |n| {
        common::frames::take_frames(source.frames(), n, Duration::from_secs(20), || {
            source.stats()
        })
    };
    take(10);
    let faults = emulator.faults("cam-1").unwrap();
    faults.fail_next(Request::MediaFragment, Failure::Corrupt, 1);
    take(10);
    faults.fail_next(Request::MediaFragment, Failure::Reset, 1);
    faults.fail_next(Request::MediaPlaylist, Failure::ServerError, 2);
    take(10);
    faults.revoke_sessions();
    take(10);
    faults.server_errors(Duration::from_millis(1500));
    take(10);
    source.stop();
    let stats = source.stats();
    assert!(
        stats.read_errors >= 2 && stats.url_refreshes + stats.reconnects >= 1,
        "the faults were seen: {stats:?}"
    );
    assert!(stats.frames_dropped_target_fps > 0, "{stats:?}");
    let text = prometheus::TextEncoder::new()
        .encode_to_string(&registry.gather())
        .unwrap();
    let camera = "{camera_id=\"acct\"}";
    let pairs = [
        ("kvs_hls_frames_total", stats.frames_delivered),
        ("kvs_hls_reconnects_total", stats.reconnects),
        ("kvs_hls_url_refreshes_total", stats.url_refreshes),
        ("kvs_hls_read_errors_total", stats.read_errors),
        ("kvs_hls_fragments_total", stats.fragments_fetched),
        ("kvs_hls_fragment_bytes_total", stats.bytes_fetched),
        (
            "kvs_hls_fragment_fetch_seconds_count",
            stats.fragments_fetched,
        ),
        ("kvs_hls_frame_age_seconds_count", stats.frames_delivered),
    ];
    for (name, field) in pairs {
        assert_eq!(
            metric(&text, &format!("{name}{camera}")) as u64,
            field,
            "{name} vs stats: {stats:?}\n{text}"
        );
    }
    let dropped = |reason: &str| {
        let series =
            format!("kvs_hls_frames_dropped_total{{camera_id=\"acct\",reason=\"{reason}\"}}");
        if text.lines().any(|l| l.starts_with(&series)) {
            metric(&text, &series) as u64
        } else {
            0
        }
    };
    assert_eq!(
        dropped("target_fps"),
        stats.frames_dropped_target_fps,
        "{text}"
    );
    assert_eq!(
        dropped("queue_full"),
        stats.frames_dropped_queue_full,
        "{text}"
    );
    assert_eq!(
        metric(&text, &format!("kvs_hls_connection_state{camera}")) as i64,
        stats.state as i64,
        "{text}"
    );
    let newest = stats
        .last_frame_producer_time
        .unwrap()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    let gauge = metric(&text, &format!("kvs_hls_last_frame_timestamp{camera}"));
    assert!(
        (gauge - newest).abs() < 0.002,
        "gauge {gauge} vs stats {newest}"
    );
}
