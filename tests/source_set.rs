//! `SourceSet` against the emulator: several live cameras as one stream, a stalled camera that
//! holds nobody up, cameras added and removed at runtime, one stop for all; and the
//! `multi_camera` example as a short smoke test.

mod common;

use std::collections::BTreeMap;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use kvs_emulator::Emulator;
use kvs_frames::{
    DeliveryPolicy, ErrorKind, KvsHlsFrameSource, PixelFormat, PlaybackMode, SourceSet,
};

fn live(emulator: &Emulator, camera: &str) -> KvsHlsFrameSource {
    KvsHlsFrameSource::builder(camera, camera)
        .sdk_config(&emulator.sdk_config())
        .pixel_format(PixelFormat::Gray8)
        .delivery(DeliveryPolicy::Block)
        .request_timeout(Duration::from_secs(3))
        .build()
        .unwrap()
}

/// Frames per camera, and each camera's frame sequence numbers, until `done` or `timeout`.
async fn read_until(
    stream: &mut kvs_frames::SetStream,
    timeout: Duration,
    mut done: impl FnMut(&BTreeMap<String, Vec<u64>>) -> bool,
) -> BTreeMap<String, Vec<u64>> {
    let mut seen: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + timeout;
    while !done(&seen) {
        let next = tokio::time::timeout_at(deadline, stream.next()).await;
        let Ok(Some((camera, item))) = next else {
            panic!("the set ended or stalled: {:?}", counts(&seen));
        };
        let (frame, _) = item.unwrap_or_else(|e| panic!("{camera}: {e}"));
        assert!(
            frame.age().is_some_and(|a| a < Duration::from_secs(5)),
            "{camera}: a live frame {:?} old",
            frame.age()
        );
        seen.entry(camera.to_string())
            .or_default()
            .push(frame.sequence());
    }
    seen
}

fn counts(seen: &BTreeMap<String, Vec<u64>>) -> BTreeMap<&str, usize> {
    seen.iter().map(|(k, v)| (k.as_str(), v.len())).collect()
}

/// No frame of a camera skipped: its sequence numbers follow each other.
fn contiguous(frames: &[u64]) -> bool {
    frames.windows(2).all(|w| w[1] == w[0] + 1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_camera_holds_nobody_up_and_cameras_come_and_go() {
    let emulator = common::start(vec![
        common::small("cam-a").fps(10),
        common::small("cam-b").fps(10),
        common::small("cam-stalled").fps(10),
    ]);
    // The stalled camera's fragment downloads hang: its reader gets nothing for a minute.
    emulator
        .faults("cam-stalled")
        .unwrap()
        .stall_fragment_downloads(Duration::from_secs(60), Duration::from_secs(60));
    let set = SourceSet::new();
    // The stalled camera first: a set that polled in a fixed order would wait on it.
    for camera in ["cam-stalled", "cam-a", "cam-b"] {
        set.add(live(&emulator, camera)).unwrap();
    }
    let err = set.add(live(&emulator, "cam-a")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
    assert!(err.to_string().contains("cam-a"), "{err}");
    assert_eq!(set.camera_ids(), ["cam-stalled", "cam-a", "cam-b"]);

    // 3 s of video from each live camera, every frame, while the third is stalled.
    let mut stream = set.stream();
    let seen = read_until(&mut stream, Duration::from_secs(40), |seen| {
        ["cam-a", "cam-b"]
            .iter()
            .all(|c| seen.get(*c).is_some_and(|v| v.len() >= 30))
    })
    .await;
    assert!(!seen.contains_key("cam-stalled"), "{:?}", counts(&seen));
    for camera in ["cam-a", "cam-b"] {
        assert!(contiguous(&seen[camera]), "{camera}: {:?}", seen[camera]);
    }
    let stats = set.aggregate_stats();
    assert_eq!(stats.cameras, 3);
    assert!(stats.frames_delivered >= 60, "{stats:?}");
    assert_eq!(set.stats()["cam-stalled"].frames_delivered, 0);

    // Removed: no more of its frames. Added back (a new source): its frames again.
    assert!(set.remove("cam-b"));
    assert!(!set.remove("cam-b"));
    let seen = read_until(&mut stream, Duration::from_secs(20), |seen| {
        seen.get("cam-a").is_some_and(|v| v.len() >= 15)
    })
    .await;
    assert!(!seen.contains_key("cam-b"), "{:?}", counts(&seen));
    set.add(live(&emulator, "cam-b")).unwrap();
    let seen = read_until(&mut stream, Duration::from_secs(30), |seen| {
        seen.get("cam-b").is_some_and(|v| v.len() >= 10)
    })
    .await;
    assert!(contiguous(&seen["cam-b"]));

    // One stop for all: the stream ends, later adds are refused.
    let stopped_at = Instant::now();
    set.stop();
    let drained = tokio::time::timeout(Duration::from_secs(10), async {
        let mut n = 0;
        while stream.next().await.is_some() {
            n += 1;
        }
        n
    })
    .await
    .expect("the stream ends after stop()");
    assert!(drained <= 3 * 30, "{drained} frames after stop");
    assert!(stopped_at.elapsed() < Duration::from_secs(10));
    let err = set.add(live(&emulator, "cam-c")).unwrap_err();
    assert_eq!(err.kind(), ErrorKind::Stopped);
}

#[test]
fn cameras_that_always_have_a_frame_ready_take_turns() {
    // Two archives (ON_DEMAND, Block): both queues stay full behind a reader that takes 100
    // frames a second, so every poll finds both ready. The set must alternate; a set that
    // polled in a fixed order would hand out one camera's frames until its decoder fell behind.
    let emulator = common::start(vec![
        common::small("first")
            .history(Duration::from_secs(10))
            .live(false),
        common::small("second")
            .history(Duration::from_secs(10))
            .live(false),
    ]);
    let set = SourceSet::new();
    for name in ["first", "second"] {
        assert!(emulator.wait_for_fragments(name, 10, Duration::from_secs(60)));
        let truth = emulator.ground_truth(name);
        set.add(
            KvsHlsFrameSource::builder(name, name)
                .sdk_config(&emulator.sdk_config())
                .pixel_format(PixelFormat::Gray8)
                .playback(PlaybackMode::OnDemand {
                    start: truth[0].producer_start,
                    end: truth[9].producer_start,
                })
                .build()
                .unwrap(),
        )
        .unwrap();
    }
    // Let both queues fill (30 frames each), then read slowly with the blocking iterator.
    std::thread::sleep(Duration::from_secs(3));
    let order: Vec<String> = set
        .frames()
        .take(150)
        .map(|(camera, item)| {
            item.unwrap();
            std::thread::sleep(Duration::from_millis(10));
            camera.to_string()
        })
        .collect();
    let longest_run = order
        .chunk_by(|a, b| a == b)
        .map(<[String]>::len)
        .max()
        .unwrap();
    assert!(
        longest_run <= 3,
        "runs of one camera up to {longest_run}: {order:?}"
    );
    let first = order.iter().filter(|c| *c == "first").count();
    assert!(
        (60..=90).contains(&first),
        "{first} of 150 from the first: {order:?}"
    );
    set.stop();
    assert!(
        set.frames().count() <= 60,
        "only what was queued is left after stop"
    );
}

/// `examples/multi_camera.rs` as a smoke test: three emulator cameras for a few seconds, a
/// stats line per camera, metrics served, exit 0.
#[test]
fn the_multi_camera_example_reads_every_camera_and_exits_cleanly() {
    let exe = std::env::current_exe().unwrap();
    let Some(example) = exe
        .parent()
        .and_then(|p| p.parent())
        .map(|p| p.join("examples").join("multi_camera"))
        .filter(|p| p.exists())
    else {
        eprintln!("examples not built (run with --examples): skipped");
        return;
    };
    let mut child = Command::new(example)
        .args([
            "--cameras",
            "3",
            "--duration",
            "8",
            "--metrics",
            "127.0.0.1:0",
        ])
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let lines = std::thread::spawn(move || {
        use std::io::{BufRead, Read, Write};
        let mut all = Vec::new();
        let mut metrics = String::new();
        for line in std::io::BufReader::new(stdout).lines() {
            let line = line.unwrap();
            if let Some(url) = line.strip_prefix("metrics: http://")
                && let Some(addr) = url.strip_suffix("/metrics")
            {
                // Scrape once the cameras had a few seconds.
                std::thread::sleep(Duration::from_secs(4));
                let mut socket = std::net::TcpStream::connect(addr).unwrap();
                socket
                    .write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                    .unwrap();
                socket.read_to_string(&mut metrics).unwrap();
            }
            all.push(line);
        }
        (all.join("\n"), metrics)
    });
    let status = child.wait().unwrap();
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    let (stdout, metrics) = lines.join().unwrap();
    assert!(status.success(), "{stdout}\n{stderr}");
    for camera in ["cam-1", "cam-2", "cam-3"] {
        let line = stdout
            .lines()
            .rev()
            .find(|l| l.starts_with(&format!("{camera} ")))
            .unwrap_or_else(|| panic!("no stats line for {camera}:\n{stdout}"));
        let frames: u64 = line
            .split_whitespace()
            .find_map(|w| w.strip_prefix("frames="))
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{line}"));
        assert!(frames > 10, "{line}");
        assert!(
            metrics.contains(&format!("kvs_hls_frames_total{{camera_id=\"{camera}\"}}")),
            "{metrics}"
        );
    }
    assert!(metrics.starts_with("HTTP/1.1 200"), "{metrics}");
}
