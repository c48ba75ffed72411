//! The emulator's HLS, GetClip and faults, read over real HTTP and decoded by real GStreamer.

mod common;

use std::time::{Duration, Instant, SystemTime};

use aws_sdk_kinesisvideoarchivedmedia::types::{
    ClipFragmentSelector, ClipFragmentSelectorType, ClipTimestampRange, HlsDiscontinuityMode,
    HlsFragmentSelectorType, HlsPlaybackMode,
};
use common::{SessionParams, dt, get, resolve, small};
use kvs_emulator::{DecodeTimeOrigin, FragmentRecord};
use kvs_frames::error::{Error, ErrorKind};

fn pdt(t: SystemTime) -> chrono::DateTime<chrono::FixedOffset> {
    let utc: chrono::DateTime<chrono::Utc> = t.into();
    utc.fixed_offset()
}

/// Milliseconds, the precision of `EXT-X-PROGRAM-DATE-TIME`.
fn ms(t: SystemTime) -> i64 {
    pdt(t).timestamp_millis()
}

/// Fetches the init segment and the listed fragments of a media playlist, concatenated.
async fn download(playlist_url: &str, playlist: &m3u8_rs::MediaPlaylist) -> Vec<u8> {
    let mut bytes = Vec::new();
    let mut last_map = None;
    for segment in &playlist.segments {
        if let Some(map) = &segment.map
            && last_map.as_deref() != Some(map.uri.as_str())
        {
            let init = get(&resolve(playlist_url, &map.uri)).await.unwrap();
            assert_eq!(init.status, 200, "init: {}", init.text());
            bytes.extend_from_slice(&init.body);
            last_map = Some(map.uri.clone());
        }
        let fragment = get(&resolve(playlist_url, &segment.uri)).await.unwrap();
        assert_eq!(fragment.status, 200, "fragment: {}", fragment.text());
        bytes.extend_from_slice(&fragment.body);
    }
    bytes
}

fn expected_frames(records: &[FragmentRecord]) -> Vec<u32> {
    records
        .iter()
        .flat_map(|r| (r.first_frame..r.first_frame + u64::from(r.frame_count)).map(|n| n as u32))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audio_is_track_2_in_the_same_fragments_and_decodes() {
    let emulator = common::start(vec![small("av").audio(true)]);
    common::wait_fragments(&emulator, "av", 2, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "av").await;
    let master_url = common::session(&media, "av", &SessionParams::default())
        .await
        .unwrap();
    let text = get(&master_url).await.unwrap().text();
    assert!(text.contains(",mp4a.40.2\""), "{text}");
    let media_url = common::media_playlist_url(&master_url).await;
    let playlist = common::parse_media(&get(&media_url).await.unwrap().text());
    let map = playlist.segments[0]
        .map
        .as_ref()
        .expect("EXT-X-MAP")
        .uri
        .clone();
    let init = get(&common::resolve(&media_url, &map)).await.unwrap().body;
    let count = |data: &[u8], kind: &[u8]| data.windows(4).filter(|w| *w == kind).count();
    assert_eq!(count(&init, b"trak"), 2);
    assert_eq!(count(&init, b"trex"), 2);
    assert!(count(&init, b"mp4a") == 1 && count(&init, b"esds") == 1 && count(&init, b"smhd") == 1);
    let segment = &playlist.segments[0];
    let fragment = get(&common::resolve(&media_url, &segment.uri))
        .await
        .unwrap()
        .body;
    assert_eq!(
        count(&fragment, b"traf"),
        2,
        "video and audio in one fragment"
    );
    // Decoded by GStreamer (qtdemux sees both tracks): the video frames are all there.
    let truth = emulator.ground_truth("av");
    let data = [init, fragment].concat();
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&data))
        .await
        .unwrap();
    let numbers: Vec<u32> = frames.iter().filter_map(|f| f.frame_number).collect();
    let pdt_ms = segment.program_date_time.unwrap().timestamp_millis();
    let record = truth
        .iter()
        .find(|r| {
            r.producer_start
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_millis() as i64
                == pdt_ms
        })
        .expect("the fragment in the ground truth");
    let first = record.first_frame as u32;
    assert_eq!(numbers, (first..first + 25).collect::<Vec<_>>());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h265_streams_are_served_as_hvc1_with_an_hevc_codecs_attribute() {
    let emulator = common::start(vec![small("hevc").codec(kvs_emulator::VideoCodec::H265)]);
    let media = common::media(&emulator, "hevc").await;
    let master_url = common::session(&media, "hevc", &SessionParams::default())
        .await
        .unwrap();
    let text = get(&master_url).await.unwrap().text();
    // Main profile: hvc1.1.6.L<level>.B0 (RFC 6381, ISO/IEC 14496-15 annex E).
    assert!(text.contains("CODECS=\"hvc1.1.6.L"), "{text}");
    let media_url = common::media_playlist_url(&master_url).await;
    let playlist = common::parse_media(&get(&media_url).await.unwrap().text());
    let map = playlist.segments[0]
        .map
        .as_ref()
        .expect("EXT-X-MAP")
        .uri
        .clone();
    let init = get(&common::resolve(&media_url, &map)).await.unwrap();
    let body = init.body.to_vec();
    assert!(body.windows(4).any(|w| w == b"hvc1") && body.windows(4).any(|w| w == b"hvcC"));
    assert!(!body.windows(4).any(|w| w == b"avcC"));
    let control = common::control(&emulator);
    let described = control
        .describe_stream()
        .stream_name("hevc")
        .send()
        .await
        .unwrap();
    assert_eq!(
        described.stream_info().and_then(|i| i.media_type()),
        Some("video/h265")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn live_playlists_have_the_kvs_shape_and_decode_to_the_ground_truth() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(3))]);
    common::wait_fragments(&emulator, "cam-1", 4, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let master_url = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap();

    let master = get(&master_url).await.unwrap();
    assert_eq!(master.status, 200);
    let text = master.text();
    assert!(text.contains("#EXT-X-STREAM-INF:CODECS=\"avc1."), "{text}");
    let parsed = common::parse_master(&text);
    assert_eq!(parsed.variants.len(), 1);
    let variant = &parsed.variants[0];
    assert_eq!(
        variant.resolution.map(|r| (r.width, r.height)),
        Some((320, 240))
    );
    assert_eq!(variant.frame_rate, Some(25.0));
    assert!(
        variant
            .uri
            .starts_with("getHLSMediaPlaylist.m3u8?SessionToken=")
    );
    assert!(variant.uri.ends_with("&TrackNumber=1"));
    // The token carries characters that must be percent-encoded, and they are.
    let token = variant.uri["getHLSMediaPlaylist.m3u8?SessionToken=".len()..]
        .trim_end_matches("&TrackNumber=1");
    assert!(token.contains('%'), "{token}");
    assert!(!token.contains('+') && !token.contains('/') && !token.contains('='));

    let playlist_url = resolve(&master_url, &variant.uri);
    let response = get(&playlist_url).await.unwrap();
    assert_eq!(response.status, 200);
    let text = response.text();
    assert!(text.starts_with("#EXTM3U\n#EXT-X-VERSION:7\n"), "{text}");
    assert!(text.contains("#EXT-X-INDEPENDENT-SEGMENTS"));
    assert!(!text.contains("#EXT-X-ENDLIST"), "LIVE playlists never end");
    let playlist = common::parse_media(&text);
    assert_eq!(
        playlist.media_sequence, 0,
        "media sequence is session-local"
    );
    assert_eq!(playlist.target_duration, 1);
    assert!(!playlist.segments.is_empty() && playlist.segments.len() <= 5);
    assert!(
        playlist.segments[0].map.is_some(),
        "EXT-X-MAP before the first fragment"
    );
    // PRODUCER_TIMESTAMP defaults to HlsDiscontinuityMode NEVER.
    assert!(playlist.segments.iter().all(|s| !s.discontinuity));
    let truth = emulator.ground_truth("cam-1");
    let mut records = Vec::new();
    for (i, segment) in playlist.segments.iter().enumerate() {
        assert!(
            segment.uri.starts_with(&format!(
                "getMP4MediaFragment.mp4?FragmentNumber={i}&SessionToken="
            )),
            "{}",
            segment.uri
        );
        assert!((segment.duration - 1.0).abs() < 1e-6);
        let time = segment
            .program_date_time
            .expect("PROGRAM-DATE-TIME on every fragment");
        let record = truth
            .iter()
            .find(|r| ms(r.producer_start) == time.timestamp_millis())
            .unwrap_or_else(|| panic!("no ground-truth fragment starts at {time}"));
        records.push(record.clone());
    }
    // Consecutive fragments, and the newest is listed.
    for pair in records.windows(2) {
        assert_eq!(pair[1].index, pair[0].index + 1);
    }

    // Decode what the playlist lists: the barcodes are exactly the ground-truth frames.
    let bytes = download(&playlist_url, &playlist).await;
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
        .await
        .unwrap();
    let numbers: Vec<u32> = frames
        .iter()
        .map(|f| f.frame_number.expect("barcode"))
        .collect();
    assert_eq!(numbers, expected_frames(&records));
    assert!(frames.iter().all(|f| f.width == 320 && f.height == 240));
    // The decode time is continuous, starts at 0 in each session (DecodeTimeOrigin::Session)
    // and is not wall time.
    let first_pts = frames[0].pts.unwrap();
    assert_eq!(first_pts, gstreamer::ClockTime::ZERO);
    let wall = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap();
    assert!(
        (first_pts.nseconds() as i128 - wall.as_nanos() as i128).abs() > 3600 * 1_000_000_000,
        "tfdt must not equal wall time"
    );
    for pair in frames.windows(2) {
        assert_eq!(
            pair[1].pts.unwrap() - pair[0].pts.unwrap(),
            gstreamer::ClockTime::from_mseconds(40)
        );
    }
    // The producer time of frame n is known to the emulator.
    let n = u64::from(numbers[0]);
    assert_eq!(
        emulator.frame_producer_time("cam-1", n).map(ms),
        Some(ms(records[0].producer_start))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_timestamps_and_discontinuity_modes() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(4))]);
    common::wait_fragments(&emulator, "cam-1", 4, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;

    // SERVER_TIMESTAMP defaults to ALWAYS, and its times are the server's.
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            selector: HlsFragmentSelectorType::ServerTimestamp,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
    assert!(playlist.segments.iter().all(|s| s.discontinuity));
    // The truth as of now: the live playlist may list a fragment published after the first look.
    let truth = emulator.ground_truth("cam-1");
    for segment in &playlist.segments {
        let time = segment.program_date_time.unwrap().timestamp_millis();
        let record = truth
            .iter()
            .find(|r| ms(r.server_start) == time)
            .expect("server time of a ground-truth fragment");
        assert_eq!(
            record
                .server_start
                .duration_since(record.producer_start)
                .unwrap(),
            Duration::from_millis(300)
        );
    }

    // ON_DISCONTINUITY: none while the camera runs without gaps.
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            discontinuity: Some(HlsDiscontinuityMode::OnDiscontinuity),
            display: false,
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let text = get(&playlist_url).await.unwrap().text();
    assert!(!text.contains("#EXT-X-DISCONTINUITY"), "{text}");
    assert!(
        !text.contains("#EXT-X-PROGRAM-DATE-TIME"),
        "display NEVER: {text}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_demand_and_live_replay_sessions() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(8))]);
    common::wait_fragments(&emulator, "cam-1", 8, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let truth = emulator.ground_truth("cam-1");
    let (start, end) = (truth[2].producer_start, truth[6].producer_start);

    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            mode: HlsPlaybackMode::OnDemand,
            range: Some((dt(start), Some(dt(end)))),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let text = get(&playlist_url).await.unwrap().text();
    assert!(text.contains("#EXT-X-PLAYLIST-TYPE:VOD"), "{text}");
    assert!(text.trim_end().ends_with("#EXT-X-ENDLIST"), "{text}");
    let playlist = common::parse_media(&text);
    let times: Vec<i64> = playlist
        .segments
        .iter()
        .map(|s| s.program_date_time.unwrap().timestamp_millis())
        .collect();
    let want: Vec<i64> = truth[2..=6].iter().map(|r| ms(r.producer_start)).collect();
    assert_eq!(
        times, want,
        "fragments whose start lies in the inclusive range"
    );
    let bytes = download(&playlist_url, &playlist).await;
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
        .await
        .unwrap();
    let numbers: Vec<u32> = frames.iter().map(|f| f.frame_number.unwrap()).collect();
    assert_eq!(numbers, expected_frames(&truth[2..=6]));

    // LIVE_REPLAY: starts at the start time and adds a fragment per fragment duration.
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            mode: HlsPlaybackMode::LiveReplay,
            range: Some((dt(truth[1].producer_start), None)),
            max_results: Some(10),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let first = common::parse_media(&get(&playlist_url).await.unwrap().text());
    assert_eq!(
        first.segments[0]
            .program_date_time
            .unwrap()
            .timestamp_millis(),
        ms(truth[1].producer_start)
    );
    let before = first.segments.len();
    assert!(
        before < 7,
        "LIVE_REPLAY starts small, not with the whole archive: {before}"
    );
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let later = common::parse_media(&get(&playlist_url).await.unwrap().text());
    assert!(
        later.segments.len() > before,
        "one fragment more per fragment duration: {} then {}",
        before,
        later.segments.len()
    );
    assert!(!later.end_list);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expiry_revocation_and_quotas() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(2))]);
    common::wait_fragments(&emulator, "cam-1", 2, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;

    // Expiry: 403 NotAuthorizedException "Streaming session token is expired".
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            expires: Some(300),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
    emulator.advance_session_clock(Duration::from_secs(301));
    let expired = get(&playlist_url).await.unwrap();
    assert_eq!(expired.status, 403);
    assert_eq!(
        expired.error_type.as_deref(),
        Some("NotAuthorizedException")
    );
    assert!(
        expired
            .text()
            .contains("Streaming session token is expired")
    );
    let e = Error::from_hls_response(403, expired.error_type.as_deref(), &expired.body);
    assert_eq!(e.kind(), ErrorKind::SessionExpired);
    assert!(e.is_transient());

    // A new session works; revocation ends it.
    let url = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
    emulator.faults("cam-1").unwrap().revoke_sessions();
    assert_eq!(get(&playlist_url).await.unwrap().status, 403);
    assert_eq!(get(&url).await.unwrap().status, 403);

    // Quota: 5 media playlist requests per second per session. Sent at once, so that a slow
    // machine cannot spread them over more than a second.
    let url = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let responses = futures_util::future::join_all((0..20).map(|_| get(&playlist_url))).await;
    let statuses: Vec<(u16, Option<String>)> = responses
        .into_iter()
        .map(|r| {
            let r = r.unwrap();
            (r.status, r.error_type)
        })
        .collect();
    let throttled = statuses
        .iter()
        .filter(|(s, t)| *s == 400 && t.as_deref() == Some("ClientLimitExceededException"))
        .count();
    let ok = statuses.iter().filter(|(s, _)| *s == 200).count();
    assert!(throttled >= 5, "{statuses:?}");
    assert!((1..=15).contains(&ok), "{statuses:?}");
    // After a second the quota is back.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_clip_is_a_playable_mp4_of_the_range() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(8))]);
    common::wait_fragments(&emulator, "cam-1", 8, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let truth = emulator.ground_truth("cam-1");
    let out = media
        .get_clip()
        .stream_name("cam-1")
        .clip_fragment_selector(
            ClipFragmentSelector::builder()
                .fragment_selector_type(ClipFragmentSelectorType::ProducerTimestamp)
                .timestamp_range(
                    ClipTimestampRange::builder()
                        .start_timestamp(dt(truth[1].producer_start))
                        .end_timestamp(dt(truth[5].producer_start))
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(out.content_type(), Some("video/mp4"));
    let bytes = out.payload.collect().await.unwrap().into_bytes().to_vec();
    assert_eq!(&bytes[4..8], b"ftyp");
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
        .await
        .unwrap();
    let numbers: Vec<u32> = frames.iter().map(|f| f.frame_number.unwrap()).collect();
    assert_eq!(numbers, expected_frames(&truth[1..=5]));

    // An empty range is a typed "no fragments" error.
    let hour_ago = SystemTime::now() - Duration::from_secs(3600);
    let err = media
        .get_clip()
        .stream_name("cam-1")
        .clip_fragment_selector(
            ClipFragmentSelector::builder()
                .fragment_selector_type(ClipFragmentSelectorType::ServerTimestamp)
                .timestamp_range(
                    ClipTimestampRange::builder()
                        .start_timestamp(dt(hour_ago))
                        .end_timestamp(dt(hour_ago + Duration::from_secs(60)))
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap_err();
    assert!(
        err.as_service_error()
            .unwrap()
            .is_resource_not_found_exception()
    );
    assert_eq!(
        Error::from_sdk("GetClip", err).kind(),
        ErrorKind::NoFragments
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn get_clip_stops_at_200_fragments() {
    let emulator = common::start(vec![
        small("short")
            .fps(10)
            .fragment_duration(Duration::from_millis(100))
            .history(Duration::from_secs(23)),
    ]);
    common::wait_fragments(&emulator, "short", 220, Duration::from_secs(60)).await;
    let media = common::media(&emulator, "short").await;
    let truth = emulator.ground_truth("short");
    let out = media
        .get_clip()
        .stream_name("short")
        .clip_fragment_selector(
            ClipFragmentSelector::builder()
                .fragment_selector_type(ClipFragmentSelectorType::ProducerTimestamp)
                .timestamp_range(
                    ClipTimestampRange::builder()
                        .start_timestamp(dt(truth[0].producer_start))
                        .end_timestamp(dt(truth[219].producer_start))
                        .build()
                        .unwrap(),
                )
                .build()
                .unwrap(),
        )
        .send()
        .await
        .unwrap();
    let bytes = out.payload.collect().await.unwrap().into_bytes().to_vec();
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
        .await
        .unwrap();
    let numbers: Vec<u32> = frames.iter().map(|f| f.frame_number.unwrap()).collect();
    assert_eq!(numbers, expected_frames(&truth[..200]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_faults_are_observable() {
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(3))]);
    common::wait_fragments(&emulator, "cam-1", 3, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            expires: Some(3600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
    let fragment_url = resolve(&playlist_url, &playlist.segments[0].uri);
    let faults = emulator.faults("cam-1").unwrap();

    // HTTP 500.
    faults.server_errors(Duration::from_secs(60));
    let r = get(&playlist_url).await.unwrap();
    assert_eq!(r.status, 500);
    let e = Error::from_hls_response(r.status, r.error_type.as_deref(), &r.body);
    assert_eq!(e.kind(), ErrorKind::ServiceUnavailable);
    faults.clear();
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);

    // Throttling.
    faults.throttle(Duration::from_secs(60));
    let r = get(&fragment_url).await.unwrap();
    assert_eq!(
        (r.status, r.error_type.as_deref()),
        (400, Some("ClientLimitExceededException"))
    );
    faults.clear();
    tokio::time::sleep(Duration::from_millis(300)).await;

    // Connection reset half-way through the body.
    let full = get(&fragment_url).await.unwrap();
    assert_eq!(full.status, 200);
    faults.reset_fragment_downloads(Duration::from_secs(60));
    let cut = get(&fragment_url).await;
    let err = cut.err().expect("a reset download fails");
    assert!(Error::from_reqwest(err).is_transient());
    faults.clear();

    // A stalled download: half the body, a pause, then the rest.
    faults.stall_fragment_downloads(Duration::from_secs(60), Duration::from_millis(1500));
    let started = Instant::now();
    let slow = get(&fragment_url).await.unwrap();
    assert!(started.elapsed() >= Duration::from_millis(1400));
    assert_eq!(slow.body, full.body);
    faults.clear();

    // Deletion: the session's requests now fail with 404, and DescribeStream agrees.
    faults.delete_stream();
    let r = get(&playlist_url).await.unwrap();
    assert_eq!(
        (r.status, r.error_type.as_deref()),
        (404, Some("ResourceNotFoundException"))
    );
    let e = Error::from_hls_response(r.status, r.error_type.as_deref(), &r.body);
    assert_eq!(e.kind(), ErrorKind::StreamNotFound);
    assert!(!e.is_transient());
    assert!(emulator.faults("cam-1").is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn resolution_change_brings_a_new_init_segment() {
    let emulator = common::start(vec![small("cam-1")]);
    common::wait_fragments(&emulator, "cam-1", 2, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    emulator
        .faults("cam-1")
        .unwrap()
        .change_resolution(480, 270);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !emulator
        .ground_truth("cam-1")
        .iter()
        .any(|r| r.width == 480)
    {
        assert!(Instant::now() < deadline, "no 480x270 fragment");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let truth = emulator.ground_truth("cam-1");
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            mode: HlsPlaybackMode::OnDemand,
            range: Some((dt(truth[0].producer_start), Some(dt(SystemTime::now())))),
            discontinuity: Some(HlsDiscontinuityMode::OnDiscontinuity),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
    let change = truth.iter().position(|r| r.width == 480).unwrap();
    assert!(change > 0);
    for (i, segment) in playlist.segments.iter().enumerate() {
        assert_eq!(segment.discontinuity, i == change, "fragment {i}");
        assert_eq!(segment.map.is_some(), i == 0 || i == change, "fragment {i}");
    }
    let bytes = download(&playlist_url, &playlist).await;
    let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
        .await
        .unwrap();
    let before = expected_frames(&truth[..change]).len();
    assert!(
        frames[..before]
            .iter()
            .all(|f| (f.width, f.height) == (320, 240))
    );
    assert!(
        frames[before..]
            .iter()
            .all(|f| (f.width, f.height) == (480, 270))
    );
    let numbers: Vec<u32> = frames.iter().map(|f| f.frame_number.unwrap()).collect();
    assert_eq!(numbers, expected_frames(&truth[..playlist.segments.len()]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn camera_offline_leaves_a_gap_and_live_goes_not_found() {
    let emulator = common::start(vec![small("cam-1")]);
    common::wait_fragments(&emulator, "cam-1", 2, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            expires: Some(3600),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let before = emulator.ground_truth("cam-1").len();
    emulator
        .faults("cam-1")
        .unwrap()
        .camera_offline(Duration::from_secs(33));
    // Fragments stop …
    tokio::time::sleep(Duration::from_secs(3)).await;
    let during = emulator.ground_truth("cam-1").len();
    assert!(during <= before + 1, "{before} → {during}");
    // … the playlist still answers for 30 s, then 404 "No fragments found".
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
    tokio::time::sleep(Duration::from_secs(29)).await;
    let r = get(&playlist_url).await.unwrap();
    assert_eq!(r.status, 404, "{}", r.text());
    let e = Error::from_hls_response(r.status, r.error_type.as_deref(), &r.body);
    assert_eq!(e.kind(), ErrorKind::NoFragments);
    // The camera comes back: fragments resume after a gap in producer time.
    common::wait_fragments(&emulator, "cam-1", during + 2, Duration::from_secs(10)).await;
    let truth = emulator.ground_truth("cam-1");
    let gap = truth
        .windows(2)
        .map(|w| {
            w[1].producer_start
                .duration_since(w[0].producer_start)
                .unwrap()
        })
        .max()
        .unwrap();
    assert!(gap >= Duration::from_secs(30), "gap {gap:?}");
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_decode_time_origin_is_shared_by_sessions_and_far_from_zero() {
    let emulator = common::start(vec![
        small("cam-1")
            .history(Duration::from_secs(3))
            .decode_time_origin(DecodeTimeOrigin::Stream),
    ]);
    common::wait_fragments(&emulator, "cam-1", 3, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let truth = emulator.ground_truth("cam-1");
    let params = SessionParams {
        mode: HlsPlaybackMode::OnDemand,
        range: Some((
            dt(truth[1].producer_start),
            Some(dt(truth[1].producer_start + Duration::from_millis(500))),
        )),
        ..Default::default()
    };
    let mut first_pts = Vec::new();
    for _ in 0..2 {
        let url = common::session(&media, "cam-1", &params).await.unwrap();
        let playlist_url = common::media_playlist_url(&url).await;
        let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
        assert_eq!(playlist.segments.len(), 1);
        let bytes = download(&playlist_url, &playlist).await;
        let frames = tokio::task::spawn_blocking(move || common::decode_mp4(&bytes))
            .await
            .unwrap();
        first_pts.push(frames[0].pts.unwrap());
    }
    assert_eq!(first_pts[0], first_pts[1], "one timeline for every session");
    assert!(
        first_pts[0] > gstreamer::ClockTime::from_seconds(100 * 3600),
        "{first_pts:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_shot_faults_hit_exactly_the_next_requests_of_their_kind() {
    use kvs_emulator::{Failure, Request};
    let emulator = common::start(vec![small("cam-1").history(Duration::from_secs(3))]);
    common::wait_fragments(&emulator, "cam-1", 3, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let params = SessionParams {
        mode: HlsPlaybackMode::OnDemand,
        range: Some((
            dt(SystemTime::now() - Duration::from_secs(3600)),
            Some(dt(SystemTime::now())),
        )),
        ..Default::default()
    };
    let url = common::session(&media, "cam-1", &params).await.unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
    let fragment_url = resolve(&playlist_url, &playlist.segments[0].uri);
    let init_url = resolve(
        &playlist_url,
        &playlist.segments[0].map.as_ref().unwrap().uri,
    );
    let full = get(&fragment_url).await.unwrap();
    assert_eq!(full.status, 200);
    let faults = emulator.faults("cam-1").unwrap();

    // Exactly one fragment GET gets 403 (a session refused), the next one works; playlists are
    // not touched.
    faults.fail_next(Request::MediaFragment, Failure::Forbidden, 1);
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);
    let r = get(&fragment_url).await.unwrap();
    assert_eq!(
        (r.status, r.error_type.as_deref()),
        (403, Some("NotAuthorizedException"))
    );
    let e = Error::from_hls_response(r.status, r.error_type.as_deref(), &r.body);
    assert_eq!(e.kind(), ErrorKind::SessionExpired);
    assert_eq!(get(&fragment_url).await.unwrap().body, full.body);

    // The second fragment GET from now fails, the first and third work.
    faults.fail_nth(Request::MediaFragment, 2, Failure::ServerError);
    assert_eq!(get(&fragment_url).await.unwrap().status, 200);
    assert_eq!(get(&fragment_url).await.unwrap().status, 500);
    assert_eq!(get(&fragment_url).await.unwrap().status, 200);

    // Two 500s on the media playlist, then it works.
    faults.fail_next(Request::MediaPlaylist, Failure::ServerError, 2);
    for _ in 0..2 {
        assert_eq!(get(&playlist_url).await.unwrap().status, 500);
    }
    assert_eq!(get(&playlist_url).await.unwrap().status, 200);

    // Throttling of one init GET; a reset of one.
    faults.fail_next(Request::InitSegment, Failure::Throttled, 1);
    faults.fail_next(Request::InitSegment, Failure::Reset, 1);
    let r = get(&init_url).await.unwrap();
    assert_eq!(
        r.error_type.as_deref(),
        Some("ClientLimitExceededException")
    );
    assert!(get(&init_url).await.is_err(), "the body is cut short");
    let init = get(&init_url).await.unwrap();
    assert_eq!(init.status, 200);

    // A corrupt fragment: 200, the same size and boxes, a track fragment header that claims
    // fields it lacks (the KVS source tests show that it fails to decode); the next GET is the
    // real fragment again.
    faults.fail_next(Request::MediaFragment, Failure::Corrupt, 1);
    let bad = get(&fragment_url).await.unwrap();
    assert_eq!(bad.status, 200);
    assert_eq!(bad.body.len(), full.body.len());
    assert_ne!(bad.body, full.body);
    assert_eq!(&bad.body[4..8], b"moof");
    let mut good = init.body.clone();
    good.extend_from_slice(&get(&fragment_url).await.unwrap().body);
    assert_eq!(common::decode_mp4(&good).len(), 25);

    // GetHLSStreamingSessionURL: one 500 (the SDK retries it by itself), one 403 (not retried).
    faults.fail_next(Request::SessionUrl, Failure::ServerError, 1);
    common::session(&media, "cam-1", &params).await.unwrap();
    assert_eq!(
        emulator.api_call_times("GetHLSStreamingSessionURL").len(),
        3
    );
    faults.fail_next(Request::SessionUrl, Failure::Forbidden, 1);
    let err = common::session(&media, "cam-1", &params).await.unwrap_err();
    assert_eq!(
        Error::from_sdk("GetHLSStreamingSessionURL", err).kind(),
        ErrorKind::NotAuthorized
    );
    common::session(&media, "cam-1", &params).await.unwrap();
    let calls = emulator.api_call_times("GetHLSStreamingSessionURL");
    assert_eq!(calls.len(), 5);
    assert!(calls.windows(2).all(|w| w[0] <= w[1]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_shifted_producer_clock_moves_the_program_date_times_of_its_fragments() {
    use kvs_emulator::ClockShift;
    let emulator = common::start(vec![small("cam-1")]);
    common::wait_fragments(&emulator, "cam-1", 2, Duration::from_secs(20)).await;
    let faults = emulator.faults("cam-1").unwrap();
    faults.shift_producer_timestamps(
        ClockShift::Behind(Duration::from_secs(120)),
        Duration::from_millis(2500),
    );
    let before = emulator.ground_truth("cam-1").len();
    common::wait_fragments(&emulator, "cam-1", before + 5, Duration::from_secs(20)).await;
    let truth = emulator.ground_truth("cam-1");
    let media = common::media(&emulator, "cam-1").await;
    let url = common::session(
        &media,
        "cam-1",
        &SessionParams {
            max_results: Some(50),
            ..Default::default()
        },
    )
    .await
    .unwrap();
    let playlist_url = common::media_playlist_url(&url).await;
    let playlist = common::parse_media(&get(&playlist_url).await.unwrap().text());
    // The playlist lists the fragments in ingest order with the (shifted) producer times of
    // the ground truth.
    let listed: Vec<i64> = playlist
        .segments
        .iter()
        .map(|s| s.program_date_time.unwrap().timestamp_millis())
        .collect();
    let truth_ms: Vec<i64> = truth.iter().map(|r| ms(r.producer_start)).collect();
    assert_eq!(listed[..], truth_ms[truth_ms.len() - listed.len()..]);
    let steps: Vec<i64> = truth_ms.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        steps.iter().any(|d| *d < -100_000),
        "a step back: {steps:?}"
    );
    assert!(
        steps.iter().any(|d| *d > 100_000),
        "and forward again: {steps:?}"
    );
    // Server timestamps stay monotonic, and the frames' producer times follow their fragment.
    assert!(
        truth
            .windows(2)
            .all(|w| w[1].server_start > w[0].server_start)
    );
    let shifted = truth
        .iter()
        .find(|r| r.server_start > r.producer_start + Duration::from_secs(100))
        .unwrap();
    assert_eq!(
        emulator.frame_producer_time("cam-1", shifted.first_frame + 1),
        Some(shifted.producer_start + Duration::from_millis(40))
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sixth_session_closes_the_oldest_active_one() {
    let emulator = common::start(vec![small("cam-1"), small("cam-2")]);
    common::wait_fragments(&emulator, "cam-1", 1, Duration::from_secs(20)).await;
    common::wait_fragments(&emulator, "cam-2", 1, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "cam-1").await;
    let mut playlists = Vec::new();
    for _ in 0..5 {
        let url = common::session(&media, "cam-1", &SessionParams::default())
            .await
            .unwrap();
        playlists.push(common::media_playlist_url(&url).await);
    }
    // Sessions of another stream do not count.
    let other = common::session(&media, "cam-2", &SessionParams::default())
        .await
        .unwrap();
    let other = common::media_playlist_url(&other).await;
    for p in &playlists {
        assert_eq!(get(p).await.unwrap().status, 200);
    }
    assert_eq!(emulator.request_stats().sessions_closed, 0);
    // The sixth closes the oldest, and only it.
    let sixth = common::session(&media, "cam-1", &SessionParams::default())
        .await
        .unwrap();
    let sixth = common::media_playlist_url(&sixth).await;
    let r = get(&playlists[0]).await.unwrap();
    assert_eq!(
        (r.status, r.error_type.as_deref()),
        (403, Some("NotAuthorizedException"))
    );
    assert!(r.text().contains("closed"), "{}", r.text());
    assert_eq!(
        Error::from_hls_response(r.status, r.error_type.as_deref(), &r.body).kind(),
        ErrorKind::SessionExpired
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    for p in playlists[1..].iter().chain([&sixth, &other]) {
        assert_eq!(get(p).await.unwrap().status, 200);
    }
    assert_eq!(emulator.request_stats().sessions_closed, 1);
    // Expired sessions are not active: they do not count.
    emulator.advance_session_clock(Duration::from_secs(301));
    for _ in 0..5 {
        common::session(&media, "cam-1", &SessionParams::default())
            .await
            .unwrap();
    }
    assert_eq!(emulator.request_stats().sessions_closed, 1);
}

/// `ContainerFormat=MPEG_TS`: playlists without `EXT-X-MAP` listing `getTSFragment.ts`
/// segments, each a self-contained transport stream that GStreamer's `tsdemux` decodes to the
/// fragment's frames; an fMP4 session cannot fetch TS segments.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mpeg_ts_sessions_serve_transport_streams_that_tsdemux_decodes() {
    use aws_sdk_kinesisvideoarchivedmedia::types::ContainerFormat;
    let emulator = common::start(vec![
        small("ts").live(false).history(Duration::from_secs(3)),
    ]);
    common::wait_fragments(&emulator, "ts", 3, Duration::from_secs(30)).await;
    let truth = emulator.ground_truth("ts");
    let media = common::media(&emulator, "ts").await;
    let start = truth[0].producer_start - Duration::from_millis(1);
    let params = SessionParams {
        mode: HlsPlaybackMode::OnDemand,
        range: Some((dt(start), Some(dt(SystemTime::now())))),
        container: Some(ContainerFormat::MpegTs),
        ..SessionParams::default()
    };
    let master_url = common::session(&media, "ts", &params).await.unwrap();
    let media_url = common::media_playlist_url(&master_url).await;
    let text = get(&media_url).await.unwrap().text();
    assert!(!text.contains("EXT-X-MAP"), "{text}");
    let playlist = common::parse_media(&text);
    assert_eq!(playlist.segments.len(), truth.len());
    let mut expected = 0;
    for (segment, record) in playlist.segments.iter().zip(&truth) {
        assert!(
            segment.uri.starts_with("getTSFragment.ts?"),
            "{}",
            segment.uri
        );
        let body = get(&resolve(&media_url, &segment.uri)).await.unwrap();
        assert_eq!(body.status, 200, "{}", body.text());
        assert_eq!(body.body.len() % 188, 0);
        let decoded = common::decode_mp4(&body.body);
        let numbers: Vec<u32> = decoded
            .iter()
            .map(|d| d.frame_number.expect("barcode"))
            .collect();
        let want: Vec<u32> = (record.first_frame
            ..record.first_frame + u64::from(record.frame_count))
            .map(|n| n as u32)
            .collect();
        assert_eq!(numbers, want, "segment {}", segment.uri);
        expected += want.len();
    }
    assert!(expected >= 75);
    // An fMP4 session's token on the TS path: refused.
    let fmp4 = common::session(
        &media,
        "ts",
        &SessionParams {
            container: None,
            ..params
        },
    )
    .await
    .unwrap();
    let fmp4_media = common::media_playlist_url(&fmp4).await;
    let fmp4_text = get(&fmp4_media).await.unwrap().text();
    let first = common::parse_media(&fmp4_text).segments[0]
        .uri
        .replace("getMP4MediaFragment.mp4", "getTSFragment.ts");
    let refused = get(&resolve(&fmp4_media, &first)).await.unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
}

/// Decodes audio-only MP4 bytes (init + fragments) with `decodebin`: the total duration of
/// the decoded audio, and how many buffers.
fn decoded_audio(data: &[u8]) -> (Duration, usize) {
    use gstreamer as gst;
    use gstreamer::prelude::*;
    gst::init().unwrap();
    let pipeline = gst::parse::launch(
        "appsrc name=src format=bytes ! decodebin ! appsink name=sink sync=false",
    )
    .unwrap()
    .downcast::<gst::Pipeline>()
    .unwrap();
    let src = pipeline
        .by_name("src")
        .unwrap()
        .downcast::<gstreamer_app::AppSrc>()
        .unwrap();
    let sink = pipeline
        .by_name("sink")
        .unwrap()
        .downcast::<gstreamer_app::AppSink>()
        .unwrap();
    pipeline.set_state(gst::State::Playing).unwrap();
    src.push_buffer(gst::Buffer::from_slice(data.to_vec()))
        .unwrap();
    src.end_of_stream().unwrap();
    let mut total = Duration::ZERO;
    let mut buffers = 0;
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(10)) {
        let b = sample.buffer().unwrap();
        total += Duration::from_nanos(b.duration().map_or(0, |d| d.nseconds()));
        buffers += 1;
    }
    pipeline.set_state(gst::State::Null).unwrap();
    (total, buffers)
}

/// `AudioLayout::SeparateRendition`: the master playlist points at an audio rendition
/// (`EXT-X-MEDIA:TYPE=AUDIO`, `TrackNumber=2`) whose init and fragments hold the AAC track
/// alone and decode to the fragments' span; the variant's fragments hold the video alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_separate_audio_rendition_has_its_own_playlist_and_fragments() {
    let emulator = common::start(vec![
        small("av-sep").audio_layout(kvs_emulator::AudioLayout::SeparateRendition),
    ]);
    common::wait_fragments(&emulator, "av-sep", 3, Duration::from_secs(20)).await;
    let media = common::media(&emulator, "av-sep").await;
    let master_url = common::session(&media, "av-sep", &SessionParams::default())
        .await
        .unwrap();
    let text = get(&master_url).await.unwrap().text();
    assert!(text.contains("#EXT-X-MEDIA:TYPE=AUDIO"), "{text}");
    assert!(text.contains("AUDIO=\"audio\""), "{text}");
    let master = common::parse_master(&text);
    let audio_uri = master
        .alternatives
        .iter()
        .find_map(|m| m.uri.clone())
        .expect("the audio rendition's URI");
    assert!(audio_uri.contains("TrackNumber=2"), "{audio_uri}");
    let count = |data: &[u8], kind: &[u8]| data.windows(4).filter(|w| *w == kind).count();
    // The variant: video alone.
    let video_url = common::media_playlist_url(&master_url).await;
    let video = common::parse_media(&get(&video_url).await.unwrap().text());
    let map = video.segments[0]
        .map
        .as_ref()
        .expect("EXT-X-MAP")
        .uri
        .clone();
    let init = get(&resolve(&video_url, &map)).await.unwrap().body;
    assert_eq!(count(&init, b"trak"), 1);
    assert_eq!(count(&init, b"mp4a"), 0);
    let fragment = get(&resolve(&video_url, &video.segments[0].uri))
        .await
        .unwrap()
        .body;
    assert_eq!(count(&fragment, b"traf"), 1);
    // The rendition: audio alone, the same fragments' spans.
    let audio_url = resolve(&master_url, &audio_uri);
    let audio = common::parse_media(&get(&audio_url).await.unwrap().text());
    assert_eq!(
        audio
            .segments
            .iter()
            .map(|s| s.program_date_time)
            .collect::<Vec<_>>(),
        video
            .segments
            .iter()
            .map(|s| s.program_date_time)
            .collect::<Vec<_>>()
    );
    let map = audio.segments[0]
        .map
        .as_ref()
        .expect("EXT-X-MAP")
        .uri
        .clone();
    assert!(map.contains("TrackNumber=2"), "{map}");
    let mut data = get(&resolve(&audio_url, &map)).await.unwrap().body;
    assert_eq!(count(&data, b"trak"), 1);
    assert_eq!(count(&data, b"mp4a"), 1);
    let mut span = Duration::ZERO;
    for segment in &audio.segments {
        let body = get(&resolve(&audio_url, &segment.uri)).await.unwrap();
        assert_eq!(body.status, 200, "{}", body.text());
        assert_eq!(count(&body.body, b"traf"), 1);
        data.extend_from_slice(&body.body);
        span += Duration::from_secs_f64(f64::from(segment.duration));
    }
    let (decoded, buffers) = tokio::task::spawn_blocking(move || decoded_audio(&data))
        .await
        .unwrap();
    assert!(buffers > 0);
    let diff = decoded.abs_diff(span);
    assert!(
        diff <= Duration::from_millis(22) * audio.segments.len() as u32,
        "decoded {decoded:?} of audio for {span:?} of fragments"
    );
    // Track 2 does not exist where the audio is muxed.
    let muxed = common::start(vec![small("av-mux").audio(true)]);
    let muxed_media = common::media(&muxed, "av-mux").await;
    let url = common::session(&muxed_media, "av-mux", &SessionParams::default())
        .await
        .unwrap();
    let muxed_media_url = common::media_playlist_url(&url).await;
    assert!(
        muxed_media_url.contains("TrackNumber=1"),
        "{muxed_media_url}"
    );
    let refused = get(&muxed_media_url.replace("TrackNumber=1", "TrackNumber=2"))
        .await
        .unwrap();
    assert_eq!(refused.status, 400, "{}", refused.text());
}
