//! Resident memory per live 720p `KvsHlsFrameSource`, with 1, 4, 8 and 16 sources.
//!
//! `cargo run --release --example perf_memory` (or `make perf-memory`)
//!
//! Each count runs in a fresh process (this program re-executes itself): an emulator with one
//! live 1280x720 25 fps camera, its RSS measured as the baseline after warm-up, then N sources
//! reading that stream as BGR (each with its own session and decode pipeline), RSS measured
//! again after they have run for a while. Reported: (RSS with N sources − baseline) / N, and the
//! process CPU while reading.

use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use kvs_emulator::{Emulator, StreamSpec};
use kvs_frames::{KvsHlsFrameSource, PixelFormat};

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<u64>().ok())
            .unwrap_or(0)
    };
    (ticks(11) + ticks(12)) as f64 / 100.0
}

fn measure(n: usize, run_for: Duration) -> Result<()> {
    let emulator = Emulator::builder()
        .stream(
            StreamSpec::new("cam")
                .resolution(1280, 720)
                .fps(25)
                .fragment_duration(Duration::from_secs(1)),
        )
        .start()?;
    if !emulator.wait_for_fragments("cam", 2, Duration::from_secs(20)) {
        bail!("no fragments");
    }
    std::thread::sleep(Duration::from_secs(3));
    let baseline = rss_kib();
    let sources: Vec<KvsHlsFrameSource> = (0..n)
        .map(|i| {
            KvsHlsFrameSource::builder(&format!("cam-{i}"), "cam")
                .sdk_config(&emulator.sdk_config())
                .pixel_format(PixelFormat::Bgr)
                .build()
        })
        .collect::<Result<_, _>>()?;
    let readers: Vec<_> = sources
        .iter()
        .map(|s| {
            let stream = s.stream();
            std::thread::spawn(move || {
                let runtime = tokio::runtime::Builder::new_current_thread().build()?;
                runtime.block_on(async move {
                    use futures_util::StreamExt;
                    let mut stream = stream;
                    let mut n = 0u64;
                    while let Some(item) = stream.next().await {
                        let (frame, _) = item?;
                        std::hint::black_box(frame.data()[0]);
                        n += 1;
                    }
                    Ok::<u64, anyhow::Error>(n)
                })
            })
        })
        .collect();
    std::thread::sleep(Duration::from_secs(5));
    let cpu0 = cpu_seconds();
    let frames0: u64 = sources.iter().map(|s| s.stats().frames_delivered).sum();
    let t0 = Instant::now();
    std::thread::sleep(run_for);
    let cpu = (cpu_seconds() - cpu0) / t0.elapsed().as_secs_f64();
    let rss = rss_kib();
    let frames: u64 = sources.iter().map(|s| s.stats().frames_delivered).sum();
    let frames_per_second = frames.saturating_sub(frames0) as f64 / t0.elapsed().as_secs_f64();
    for s in &sources {
        s.stop();
    }
    for r in readers {
        let _ = r.join();
    }
    println!(
        "{{\"sources\":{n},\"baseline_kib\":{baseline},\"rss_kib\":{rss},\"per_source_kib\":{},\"cpu_cores\":{cpu:.3},\"frames\":{frames},\"frames_per_second\":{frames_per_second:.1}}}",
        rss.saturating_sub(baseline) / n as u64
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let run_for = Duration::from_secs(15);
    if let Some(n) = args
        .iter()
        .position(|a| a == "--only")
        .and_then(|i| args.get(i + 1))
    {
        return measure(n.parse().context("--only N")?, run_for);
    }
    let exe = std::env::current_exe()?;
    println!(
        "| live 720p sources | RSS above baseline | per source | process CPU (cores, incl. the emulator's encoder) | frames/s per source |"
    );
    println!("|---|---|---|---|---|");
    for n in [1, 4, 8, 16] {
        let out = std::process::Command::new(&exe)
            .args(["--only", &n.to_string()])
            .stderr(std::process::Stdio::inherit())
            .output()?;
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.starts_with('{'))
            .context("no result line")?;
        let v: serde_json::Value = serde_json::from_str(line)?;
        let mib = |k: &str| v[k].as_u64().unwrap_or(0) as f64 / 1024.0;
        println!(
            "| {n} | {:.0} MiB | {:.0} MiB | {:.2} | {:.1} |",
            mib("rss_kib") - mib("baseline_kib"),
            mib("per_source_kib"),
            v["cpu_cores"].as_f64().unwrap_or(0.0),
            v["frames_per_second"].as_f64().unwrap_or(0.0) / n as f64
        );
    }
    Ok(())
}
