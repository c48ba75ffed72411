//! KvsHlsFrameSource throughput and CPU cost, beside a bare GStreamer pipeline, in one run.
//!
//! `cargo bench --bench frame_source` (or `make bench`).
//!
//! Input: 20 s of 1280x720 25 fps H.264 (500 frames, 20 one-second fragments) archived in the
//! emulator (`live(false)`: no encoder runs while measuring), read as an ON_DEMAND session and
//! delivered as BGR.
//!
//! * group `on_demand_720p_bgr` (wall time, throughput in frames):
//!   - `bare_gstreamer`: the same init + fragment bytes, already in memory, through
//!     `appsrc ! qtdemux ! h264parse ! avdec_h264 ! videoconvert ! BGR appsink`;
//!   - `kvs_hls_frame_source`: the whole reader: GetDataEndpoint, GetHLSStreamingSessionURL,
//!     playlist, HTTP downloads from the emulator, tfdt rebasing, decode, queue, iterator;
//!   - `key_frames_only`, `target_fps_5`: the sampling modes (fewer frames delivered).
//! * group `cpu_per_frame` (process CPU time, user + system, per delivered frame): the bare
//!   pipeline, and the reader with full decoding, key frames only, target_fps 5.

use std::time::{Duration, Instant, SystemTime};

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_emulator::{Emulator, StreamSpec};
use kvs_frames::{KvsHlsFrameSource, PixelFormat, PlaybackMode};

const FRAGMENTS: usize = 20;
const FRAMES: u64 = 500;

struct Setup {
    emulator: Emulator,
    start: SystemTime,
    end: SystemTime,
    bytes: Vec<u8>,
}

fn setup() -> Setup {
    let emulator = Emulator::builder()
        .stream(
            StreamSpec::new("bench")
                .resolution(1280, 720)
                .fps(25)
                .fragment_duration(Duration::from_secs(1))
                .bitrate_kbps(2000)
                .history(Duration::from_secs(FRAGMENTS as u64))
                .live(false),
        )
        .start()
        .expect("emulator");
    assert!(emulator.wait_for_fragments("bench", FRAGMENTS, Duration::from_secs(120)));
    let truth = emulator.ground_truth("bench");
    let start = truth[0].producer_start;
    let end = truth[FRAGMENTS - 1].producer_start;
    let bytes = download(&emulator, start, end);
    Setup {
        emulator,
        start,
        end,
        bytes,
    }
}

/// The init segment and every fragment of the range, as served to a session.
fn download(emulator: &Emulator, start: SystemTime, end: SystemTime) -> Vec<u8> {
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        let config = emulator.sdk_config();
        let media = aws_sdk_kinesisvideoarchivedmedia::Client::new(&config);
        use aws_sdk_kinesisvideoarchivedmedia::types as am;
        let url = media
            .get_hls_streaming_session_url()
            .stream_name("bench")
            .playback_mode(am::HlsPlaybackMode::OnDemand)
            .hls_fragment_selector(
                am::HlsFragmentSelector::builder()
                    .fragment_selector_type(am::HlsFragmentSelectorType::ProducerTimestamp)
                    .timestamp_range(
                        am::HlsTimestampRange::builder()
                            .start_timestamp(start.into())
                            .end_timestamp(end.into())
                            .build(),
                    )
                    .build(),
            )
            .send()
            .await
            .expect("session")
            .hls_streaming_session_url
            .expect("url");
        let get = |u: String| async move {
            reqwest::get(u)
                .await
                .expect("GET")
                .bytes()
                .await
                .expect("body")
        };
        let base = url::Url::parse(&url).expect("url");
        let master = get(url.clone()).await;
        let media_url = match m3u8_rs::parse_playlist_res(&master).expect("master") {
            m3u8_rs::Playlist::MasterPlaylist(m) => base.join(&m.variants[0].uri).expect("join"),
            m3u8_rs::Playlist::MediaPlaylist(_) => base.clone(),
        };
        let playlist =
            match m3u8_rs::parse_playlist_res(&get(media_url.to_string()).await).expect("media") {
                m3u8_rs::Playlist::MediaPlaylist(p) => p,
                m3u8_rs::Playlist::MasterPlaylist(_) => panic!("expected a media playlist"),
            };
        let mut bytes = Vec::new();
        for (i, segment) in playlist.segments.iter().enumerate() {
            if i == 0 {
                let map = segment.map.as_ref().expect("EXT-X-MAP");
                bytes.extend_from_slice(
                    &get(media_url.join(&map.uri).expect("join").to_string()).await,
                );
            }
            bytes.extend_from_slice(
                &get(media_url.join(&segment.uri).expect("join").to_string()).await,
            );
        }
        assert_eq!(playlist.segments.len(), FRAGMENTS);
        bytes
    })
}

fn bare_pipeline(bytes: &[u8]) -> u64 {
    let pipeline = gst::parse::launch(
        "appsrc name=src format=bytes ! qtdemux ! h264parse ! avdec_h264 ! videoconvert ! \
         video/x-raw,format=BGR ! appsink name=sink sync=false",
    )
    .expect("pipeline")
    .downcast::<gst::Pipeline>()
    .expect("pipeline");
    let src = pipeline
        .by_name("src")
        .expect("src")
        .downcast::<gst_app::AppSrc>()
        .expect("appsrc");
    let sink = pipeline
        .by_name("sink")
        .expect("sink")
        .downcast::<gst_app::AppSink>()
        .expect("appsink");
    pipeline.set_state(gst::State::Playing).expect("playing");
    src.push_buffer(gst::Buffer::from_slice(bytes.to_vec()))
        .expect("push");
    src.end_of_stream().expect("eos");
    let mut frames = 0;
    while let Some(sample) = sink.try_pull_sample(gst::ClockTime::from_seconds(30)) {
        let buffer = sample.buffer().expect("buffer");
        let map = buffer.map_readable().expect("map");
        std::hint::black_box(map.as_slice()[0]);
        frames += 1;
    }
    pipeline.set_state(gst::State::Null).expect("null");
    frames
}

#[derive(Clone, Copy)]
enum Mode {
    Full,
    KeyFramesOnly,
    TargetFps5,
}

fn source(setup: &Setup, mode: Mode) -> u64 {
    let mut builder = KvsHlsFrameSource::builder("bench", "bench")
        .sdk_config(&setup.emulator.sdk_config())
        .pixel_format(PixelFormat::Bgr)
        .playback(PlaybackMode::OnDemand {
            start: setup.start,
            end: setup.end,
        });
    builder = match mode {
        Mode::Full => builder,
        Mode::KeyFramesOnly => builder.key_frames_only(true),
        Mode::TargetFps5 => builder.target_fps(5.0),
    };
    let source = builder.build().expect("source");
    let mut frames = 0;
    for item in source.frames() {
        let (frame, _) = item.expect("frame");
        std::hint::black_box(frame.data()[0]);
        frames += 1;
    }
    frames
}

/// CPU time (user + system) of this process, from /proc/self/stat.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // Fields after the ")" of the command name: state is field 3; utime 14, stime 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    // `rest` starts at field 3, so field n is at index n - 3. Clock ticks are 100 Hz on Linux.
    Duration::from_millis((ticks(14 - 3) + ticks(15 - 3)) * 10)
}

fn benches(c: &mut Criterion) {
    gst::init().expect("gst");
    let setup = setup();
    assert_eq!(bare_pipeline(&setup.bytes), FRAMES);
    assert_eq!(source(&setup, Mode::Full), FRAMES);
    let key_frames = source(&setup, Mode::KeyFramesOnly);
    let sampled = source(&setup, Mode::TargetFps5);

    let mut group = c.benchmark_group("on_demand_720p_bgr");
    group
        .sample_size(10)
        .measurement_time(Duration::from_secs(30));
    group.throughput(Throughput::Elements(FRAMES));
    group.bench_function("bare_gstreamer", |b| b.iter(|| bare_pipeline(&setup.bytes)));
    group.bench_function("kvs_hls_frame_source", |b| {
        b.iter(|| source(&setup, Mode::Full))
    });
    group.throughput(Throughput::Elements(key_frames));
    group.bench_function("key_frames_only", |b| {
        b.iter(|| source(&setup, Mode::KeyFramesOnly))
    });
    group.throughput(Throughput::Elements(sampled));
    group.bench_function("target_fps_5", |b| {
        b.iter(|| source(&setup, Mode::TargetFps5))
    });
    group.finish();

    // CPU per delivered frame: the "time" criterion reports is process CPU time, divided by the
    // frames delivered (throughput = 1 element = 1 frame).
    let mut cpu = c.benchmark_group("cpu_per_frame");
    cpu.sample_size(10)
        .measurement_time(Duration::from_secs(30));
    cpu.bench_function("bare_gstreamer", |b| {
        b.iter_custom(|iters| {
            let mut total = Duration::ZERO;
            for _ in 0..iters {
                let before = cpu_time();
                let frames = bare_pipeline(&setup.bytes).max(1);
                total += (cpu_time().saturating_sub(before)) / frames as u32;
            }
            total
        })
    });
    for (name, mode) in [
        ("full_decode", Mode::Full),
        ("key_frames_only", Mode::KeyFramesOnly),
        ("target_fps_5", Mode::TargetFps5),
    ] {
        cpu.bench_function(name, |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let before = cpu_time();
                    let started = Instant::now();
                    let frames = source(&setup, mode).max(1);
                    std::hint::black_box(started.elapsed());
                    total += (cpu_time().saturating_sub(before)) / frames as u32;
                }
                total
            })
        });
    }
    cpu.finish();
}

criterion_group!(frame_source, benches);
criterion_main!(frame_source);
