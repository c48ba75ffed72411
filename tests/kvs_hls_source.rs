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
    let mut frames = source.frames();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match frames.next_timeout(timeout) {
            Some(Ok((frame, ts))) => {
                assert_eq!(ts, frame.timestamp());
                out.push(frame);
            }
            Some(Err(e)) => panic!("error after {} frames: {e}", out.len()),
            None => panic!(
                "no frame within {timeout:?} after {} frames; stats {:?}",
                out.len(),
                source.stats()
            ),
        }
    }
    out
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
