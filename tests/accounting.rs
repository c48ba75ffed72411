//! After faults (5xx, revoked sessions, a corrupt fragment, a cut download), every `kvs_hls_*`
//! counter equals the matching field of `stats()`, bytes, histogram counts and the last-frame
//! gauge included (`kvs_hls_source.rs` checks `DropOldest`/`LatestOnly` accounting exactly).

mod common;

use std::time::Duration;

use kvs_emulator::{Failure, Request};
use kvs_frames::backoff::{BackoffPolicy, Jitter};
use kvs_frames::metrics::FrameSourceMetrics;
use kvs_frames::{KvsHlsFrameSource, PixelFormat};

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
    let registry = kvs_frames::prometheus::Registry::new();
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
    let text = kvs_frames::metrics::encode_text(&registry).unwrap();
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
