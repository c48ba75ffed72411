//! Latency behind the camera: the same emulator camera read through HLS and through GetMedia at
//! the same time, emit time − producer time of every frame, p50/p95/p99 of each.
//!
//! `make bench-latency` (or `cargo bench --bench latency`); `LATENCY_SECONDS` sets the run
//! length (default 30), `LATENCY_SIZE` the camera (`1280x720`, default).

use std::time::{Duration, Instant};

use kvs_emulator::{Emulator, StreamSpec};
use kvs_frames::{Frame, Frames, KvsGetMediaFrameSource, KvsHlsFrameSource, PixelFormat};

fn collect(frames: Frames<'_>, until: Instant) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut frames = frames;
    while Instant::now() < until {
        let Some(item) = frames.next_timeout(Duration::from_millis(500)) else {
            continue;
        };
        let Ok((frame, _)) = item else {
            eprintln!("error: {:?}", item.err());
            break;
        };
        if let Some(d) = latency(&frame) {
            out.push(d);
        }
    }
    out
}

fn latency(frame: &Frame) -> Option<Duration> {
    frame
        .emitted_at()
        .duration_since(frame.producer_time()?)
        .ok()
}

fn percentile(sorted: &[Duration], q: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() as f64 - 1.0) * q).round() as usize;
    sorted[i.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

fn main() {
    // `cargo bench` passes `--bench`; a filter that is not ours skips the run.
    if std::env::args()
        .skip(1)
        .any(|a| !a.starts_with('-') && !"latency".contains(&a))
    {
        return;
    }
    let seconds: u64 = std::env::var("LATENCY_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    let (width, height) = std::env::var("LATENCY_SIZE")
        .ok()
        .and_then(|s| {
            let (w, h) = s.split_once('x')?;
            Some((w.parse().ok()?, h.parse().ok()?))
        })
        .unwrap_or((1280u32, 720u32));
    let emulator = Emulator::builder()
        .stream(
            StreamSpec::new("latency")
                .resolution(width, height)
                .fps(25)
                .fragment_duration(Duration::from_secs(1)),
        )
        .start()
        .expect("emulator");
    let config = emulator.sdk_config();
    let hls = KvsHlsFrameSource::builder("hls", "latency")
        .sdk_config(&config)
        .pixel_format(PixelFormat::Bgr)
        .build()
        .expect("HLS source");
    let getmedia = KvsGetMediaFrameSource::builder("getmedia", "latency")
        .sdk_config(&config)
        .pixel_format(PixelFormat::Bgr)
        .build()
        .expect("GetMedia source");
    // Both warm up for 3 s (first session, first fragment), then are measured side by side.
    let warm = Instant::now() + Duration::from_secs(3);
    std::thread::scope(|s| {
        let a = s.spawn(|| collect(hls.frames(), warm));
        let b = s.spawn(|| collect(getmedia.frames(), warm));
        let _ = (a.join(), b.join());
    });
    let until = Instant::now() + Duration::from_secs(seconds);
    let (mut h, mut g) = std::thread::scope(|s| {
        let a = s.spawn(|| collect(hls.frames(), until));
        let b = s.spawn(|| collect(getmedia.frames(), until));
        (a.join().unwrap_or_default(), b.join().unwrap_or_default())
    });
    h.sort_unstable();
    g.sort_unstable();
    println!(
        "latency behind the camera (emit − producer time), {width}x{height} 25 fps, 1 s fragments, {seconds} s side by side:"
    );
    for (name, v) in [("HLS", &h), ("GetMedia", &g)] {
        println!(
            "  {name:9} frames={:5} p50={:7.1} ms p95={:7.1} ms p99={:7.1} ms",
            v.len(),
            percentile(v, 0.5),
            percentile(v, 0.95),
            percentile(v, 0.99)
        );
    }
    println!(
        "  GetMedia/HLS p50 ratio {:.3}",
        percentile(&g, 0.5) / percentile(&h, 0.5)
    );
    hls.stop();
    getmedia.stop();
}
