//! Soak run (not part of `make test`: the test is `#[ignore]`d): N live KVS sources against the
//! emulator for a long time, HLS sessions expiring every 5 minutes, a fault every minute, and at
//! the end every frame that exists in the emulator's ground truth delivered exactly once and
//! resident memory flat after warm-up.
//!
//! ```text
//! SOAK_MINUTES=60 SOAK_SOURCES=8 cargo test --release --all-features --test soak -- \
//!     --ignored --nocapture
//! ```
//!
//! (`cargo test`, not nextest: the project's nextest profile ends tests after 4 minutes.)
//!
//! Environment: `SOAK_MINUTES` (default 60), `SOAK_SOURCES` (8), `SOAK_FAULT_EVERY` seconds
//! (60), `SOAK_EXPIRES` seconds (300: KVS's minimum; sessions are replaced 30 s before they
//! expire), `SOAK_RSS_BAND_MB` (10: the allowed max − min after warm-up, i.e. ±5 MB). Warm-up is
//! a tenth of the run, at least 150 s.
//!
//! Two processes: the emulator (with its cameras, its archive of the last 60 fragments per
//! stream, its ground truth and the fault schedule) runs in a child process (this test binary,
//! test `soak_emulator_process`), so that the resident memory measured is the readers' alone —
//! what a service embedding the library pays — and not the test server's, whose ground truth
//! grows by design. The child's RSS is printed beside it.
//! Faults, in turn, on every stream: HTTP 500s, throttling, connection resets, a stalled
//! download, revoked sessions, a 403 on one fragment GET, two 500s on the playlist, the
//! producer clock 60 s behind for 6 s, five sessions of other readers (the sixth of a stream
//! closes the oldest), and the camera offline for 15 s (its frames never exist, so they are not
//! expected).

mod common;

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use kvs_emulator::{ClockShift, Emulator, Failure, Request, StreamSpec, barcode};
use kvs_frames::{DeliveryPolicy, KvsHlsFrameSource, PixelFormat};

fn env(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn rss_kib() -> u64 {
    rss_kib_of("self")
}

fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

const FAULTS: [&str; 10] = [
    "server_errors",
    "throttle",
    "reset",
    "stall",
    "revoke",
    "forbidden_fragment",
    "playlist_500s",
    "clock_behind",
    "other_readers",
    "camera_offline",
];

fn inject(emulator: &Emulator, stream: &str, fault: &str, runtime: &tokio::runtime::Runtime) {
    let Ok(f) = emulator.faults(stream) else {
        return;
    };
    match fault {
        "server_errors" => f.server_errors(Duration::from_secs(3)),
        "throttle" => f.throttle(Duration::from_secs(5)),
        "reset" => f.reset_fragment_downloads(Duration::from_secs(3)),
        "stall" => f.stall_fragment_downloads(Duration::from_secs(2), Duration::from_secs(15)),
        "revoke" => f.revoke_sessions(),
        "forbidden_fragment" => f.fail_next(Request::MediaFragment, Failure::Forbidden, 1),
        "playlist_500s" => f.fail_next(Request::MediaPlaylist, Failure::ServerError, 2),
        "clock_behind" => f.shift_producer_timestamps(
            ClockShift::Behind(Duration::from_secs(60)),
            Duration::from_secs(6),
        ),
        "other_readers" => runtime.block_on(async {
            let media = common::media(emulator, stream).await;
            for _ in 0..5 {
                let _ = common::session(&media, stream, &common::SessionParams::default()).await;
            }
        }),
        "camera_offline" => f.camera_offline(Duration::from_secs(15)),
        _ => {}
    }
}

struct Settings {
    run_for: Duration,
    names: Vec<String>,
    fault_every: Duration,
}

fn settings() -> Settings {
    let minutes = env("SOAK_MINUTES", 60);
    let n = env("SOAK_SOURCES", 8) as usize;
    Settings {
        run_for: Duration::from_secs(minutes * 60),
        names: (0..n).map(|i| format!("soak-{i}")).collect(),
        fault_every: Duration::from_secs(env("SOAK_FAULT_EVERY", 60).max(5)),
    }
}

/// The emulator's side, in a child process started by the soak test (it does nothing when run
/// on its own): prints `ENDPOINT url`, injects the faults for the run, and once a line arrives
/// on stdin prints the ground truth (`TRUTH stream first_frame frame_count` per fragment).
#[test]
#[ignore = "the emulator process of the soak run, started by it"]
fn soak_emulator_process() {
    if std::env::var_os("SOAK_ROLE").is_none() {
        return;
    }
    let Settings {
        run_for,
        names,
        fault_every,
    } = settings();
    let mut builder = Emulator::builder().max_fragments_per_stream(60);
    for name in &names {
        builder = builder.stream(
            StreamSpec::new(name.as_str())
                .resolution(320, 240)
                .fps(15)
                .fragment_duration(Duration::from_secs(2))
                .bitrate_kbps(300),
        );
    }
    let emulator = builder.start().expect("emulator starts");
    for name in &names {
        assert!(emulator.wait_for_fragments(name, 1, Duration::from_secs(20)));
    }
    let runtime = tokio::runtime::Runtime::new().unwrap();
    println!("ENDPOINT {}", emulator.endpoint());
    let started = Instant::now();
    let mut fault = 0usize;
    let mut next_fault = started + fault_every;
    while started.elapsed() < run_for {
        if Instant::now() >= next_fault {
            let name = FAULTS[fault % FAULTS.len()];
            eprintln!("[{:>6.0}s] fault: {name}", started.elapsed().as_secs_f64());
            for stream in &names {
                inject(&emulator, stream, name, &runtime);
            }
            fault += 1;
            next_fault += fault_every;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    println!("FAULTS {fault}");
    let mut line = String::new();
    let _ = std::io::stdin().read_line(&mut line);
    for name in &names {
        for r in emulator.ground_truth(name) {
            println!("TRUTH {name} {} {}", r.first_frame, r.frame_count);
        }
    }
    println!("END");
}

#[test]
#[ignore = "a soak run of an hour by default: run it on purpose (see the module docs)"]
fn soak_live_sources_with_expiring_sessions_and_faults() {
    let Settings { run_for, names, .. } = settings();
    let expires = Duration::from_secs(env("SOAK_EXPIRES", 300));
    let band_kib = env("SOAK_RSS_BAND_MB", 10) * 1024;
    // Memory is flat once every source has refreshed its session once.
    let warm_up = (run_for / 10)
        .max(Duration::from_secs(150))
        .min(run_for / 2);
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "soak_emulator_process",
            "--ignored",
            "--nocapture",
        ])
        .env("SOAK_ROLE", "emulator")
        // A heap profiler preloaded into the readers' process (heaptrack) stays out of the
        // emulator's.
        .env_remove("LD_PRELOAD")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("the emulator process starts");
    let child_pid = child.id().to_string();
    let mut child_out = BufReader::new(child.stdout.take().unwrap());
    let mut child_in = child.stdin.take().unwrap();
    let mut line = String::new();
    let endpoint = loop {
        line.clear();
        assert!(
            child_out.read_line(&mut line).unwrap() > 0,
            "the emulator process ended"
        );
        if let Some(url) = line.trim().strip_prefix("ENDPOINT ") {
            break url.to_owned();
        }
    };
    let config = aws_config::SdkConfig::builder()
        .behavior_version(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new("us-east-1"))
        .endpoint_url(&endpoint)
        .credentials_provider(
            aws_credential_types::provider::SharedCredentialsProvider::new(
                aws_credential_types::Credentials::new(
                    kvs_emulator::ACCESS_KEY_ID,
                    kvs_emulator::SECRET_ACCESS_KEY,
                    None,
                    None,
                    "soak",
                ),
            ),
        )
        .build();
    let stop = Arc::new(AtomicBool::new(false));
    let sources: Vec<Arc<KvsHlsFrameSource>> = names
        .iter()
        .map(|name| {
            Arc::new(
                KvsHlsFrameSource::builder(name, name.as_str())
                    .sdk_config(&config)
                    .pixel_format(PixelFormat::Gray8)
                    .delivery(DeliveryPolicy::Block)
                    .expires(expires)
                    .build()
                    .unwrap(),
            )
        })
        .collect();
    let readers: Vec<_> = sources
        .iter()
        .map(|source| {
            let source = Arc::clone(source);
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                let mut numbers: Vec<u32> = Vec::new();
                let mut frames = source.frames();
                while !stop.load(Ordering::SeqCst) {
                    match frames.next_timeout(Duration::from_millis(500)) {
                        Some(Ok((frame, _))) => numbers.push(
                            barcode::read_gray8(
                                frame.data(),
                                frame.stride(),
                                frame.width() as usize,
                                frame.height() as usize,
                            )
                            .unwrap_or(u32::MAX),
                        ),
                        Some(Err(e)) => panic!("{}: {e}", source.camera_id()),
                        None => {}
                    }
                }
                numbers
            })
        })
        .collect();
    let started = Instant::now();
    let mut rss: Vec<(Duration, u64)> = Vec::new();
    let mut next_sample = started;
    let mut child_rss = Vec::new();
    while started.elapsed() < run_for {
        if Instant::now() >= next_sample {
            let kib = rss_kib();
            if rss.len().is_multiple_of(30) {
                let emulator_kib = rss_kib_of(&child_pid);
                child_rss.push(emulator_kib);
                eprintln!(
                    "[{:>6.0}s] RSS {} MB (emulator process {} MB)",
                    started.elapsed().as_secs_f64(),
                    kib / 1024,
                    emulator_kib / 1024
                );
            }
            rss.push((started.elapsed(), kib));
            next_sample += Duration::from_secs(10);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let the last fault's recovery finish before the books are closed.
    std::thread::sleep(Duration::from_secs(20));
    stop.store(true, Ordering::SeqCst);
    let delivered: Vec<Vec<u32>> = readers.into_iter().map(|r| r.join().unwrap()).collect();
    writeln!(child_in, "done").unwrap();
    let mut truth: std::collections::HashMap<String, Vec<(u64, u32)>> = Default::default();
    let mut faults = 0u64;
    loop {
        line.clear();
        if child_out.read_line(&mut line).unwrap() == 0 || line.trim() == "END" {
            break;
        }
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["TRUTH", name, first, count] => truth
                .entry((*name).to_owned())
                .or_default()
                .push((first.parse().unwrap(), count.parse().unwrap())),
            ["FAULTS", n] => faults = n.parse().unwrap(),
            _ => {}
        }
    }
    let _ = child.wait();
    let mut failed = Vec::new();
    for ((name, source), numbers) in names.iter().zip(&sources).zip(&delivered) {
        let stats = source.stats();
        source.stop();
        let (Some(&first), Some(&last)) = (numbers.first(), numbers.last()) else {
            failed.push(format!("{name}: no frame"));
            continue;
        };
        let expected: Vec<u32> = truth
            .get(name.as_str())
            .map(Vec::as_slice)
            .unwrap_or_default()
            .iter()
            .flat_map(|&(first_frame, frame_count)| {
                (first_frame..first_frame + u64::from(frame_count)).map(|f| f as u32)
            })
            .filter(|f| (first..=last).contains(f))
            .collect();
        let mut seen = std::collections::HashSet::new();
        let repeats = numbers.iter().filter(|f| !seen.insert(**f)).count();
        let lost = expected.iter().filter(|f| !seen.contains(f)).count();
        let disorder = numbers.windows(2).filter(|w| w[1] <= w[0]).count();
        eprintln!(
            "{name}: delivered {} of {} expected, lost {lost}, repeated {repeats}, out of order {disorder}; sessions {} refreshes {} reconnects {} read_errors {} skipped {} clock_steps {} sessions_lost {} decode_errors {}",
            numbers.len(),
            expected.len(),
            stats.sessions,
            stats.url_refreshes,
            stats.reconnects,
            stats.read_errors,
            stats.fragments_skipped,
            stats.clock_steps,
            stats.sessions_lost,
            stats.decode_errors,
        );
        if lost + repeats + disorder > 0 {
            failed.push(format!(
                "{name}: lost {lost}, repeated {repeats}, out of order {disorder}"
            ));
        }
    }
    let after: Vec<u64> = rss
        .iter()
        .filter(|(t, _)| *t >= warm_up)
        .map(|(_, kib)| *kib)
        .collect();
    let (min, max) = (
        after.iter().copied().min().unwrap_or(0),
        after.iter().copied().max().unwrap_or(0),
    );
    // Least-squares slope of RSS after warm-up, in MB per hour: a leak shows as a steady slope
    // even when it stays inside the band.
    let points: Vec<(f64, f64)> = rss
        .iter()
        .filter(|(t, _)| *t >= warm_up)
        .map(|(t, kib)| (t.as_secs_f64() / 3600.0, *kib as f64 / 1024.0))
        .collect();
    let count = points.len().max(1) as f64;
    let (mean_t, mean_m) = (
        points.iter().map(|p| p.0).sum::<f64>() / count,
        points.iter().map(|p| p.1).sum::<f64>() / count,
    );
    let var_t: f64 = points.iter().map(|p| (p.0 - mean_t).powi(2)).sum();
    let slope = if var_t > 0.0 {
        points
            .iter()
            .map(|p| (p.0 - mean_t) * (p.1 - mean_m))
            .sum::<f64>()
            / var_t
    } else {
        0.0
    };
    eprintln!("RSS slope after warm-up: {slope:+.1} MB/hour");
    eprintln!(
        "RSS after {warm_up:?} of warm-up: min {} MB, max {} MB, first {} MB, last {} MB ({} samples); {} faults in {:?}",
        min / 1024,
        max / 1024,
        after.first().copied().unwrap_or(0) / 1024,
        after.last().copied().unwrap_or(0) / 1024,
        after.len(),
        faults,
        run_for
    );
    eprintln!(
        "emulator process RSS (not checked): {:?} MB",
        child_rss.iter().map(|k| k / 1024).collect::<Vec<_>>()
    );
    if max - min > band_kib {
        failed.push(format!(
            "RSS moved by {} MB after warm-up (allowed {} MB)",
            (max - min) / 1024,
            band_kib / 1024
        ));
    }
    assert!(failed.is_empty(), "{failed:#?}");
}
