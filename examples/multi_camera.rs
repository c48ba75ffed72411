//! A small detector service: N cameras read as one `SourceSet` stream, a `/metrics` endpoint,
//! a stats line per camera every few seconds, and a clean stop on Ctrl+C (or after
//! `--duration`).
//!
//! ```text
//!  KVS streams (emulator or AWS) ─┐
//!  RTSP / HLS / file URIs ────────┼─▶ SourceSet ─▶ one stream of (camera, frame, time) ─▶ detect()
//!                                 │       └─ stats, health ─▶ stats lines
//!                                 └─ FrameSourceMetrics ─▶ http://ADDR/metrics
//! ```
//!
//! ```text
//! cargo run --example multi_camera -- --cameras 4 --duration 20 --metrics 127.0.0.1:9899
//! cargo run --example multi_camera -- --stream-name front-door --stream-name yard --region eu-west-1
//! cargo run --example multi_camera -- --uri rtsp://user:pass@10.0.0.5/live --cameras 2
//! ```
//!
//! Without `--stream-name` it starts an embedded emulator with `--cameras` cameras; with it, it
//! reads those KVS streams with credentials, region and endpoint from the environment (as every
//! AWS SDK does, `AWS_ENDPOINT_URL` included).

#[path = "support/mod.rs"]
mod support;

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt as _;
use kvs_emulator::{Emulator, StreamSpec};
use kvs_frames::kvs::KvsClient;
use kvs_frames::metrics::FrameSourceMetrics;
use kvs_frames::{DeliveryPolicy, KvsHlsFrameSource, PixelFormat, SourceSet, UriFrameSource};

#[derive(Parser, Debug)]
#[command(about = "Many cameras as one stream of frames, with metrics and a clean stop")]
struct Args {
    /// A KVS stream to read (repeat for more); without it, the embedded emulator's cameras.
    #[arg(long = "stream-name")]
    stream_names: Vec<String>,
    /// An RTSP, HLS or file URI to read as well (repeat for more).
    #[arg(long = "uri")]
    uris: Vec<String>,
    /// Cameras of the embedded emulator (without --stream-name).
    #[arg(long, default_value_t = 3)]
    cameras: u32,
    /// AWS region (with --stream-name; default: from the environment).
    #[arg(long)]
    region: Option<String>,
    /// Frames per second each camera delivers at most.
    #[arg(long, default_value_t = 5.0)]
    fps: f64,
    /// Serve Prometheus metrics on this address (port 0: any free port).
    #[arg(long)]
    metrics: Option<String>,
    /// Stop after this many seconds (0: run until Ctrl+C).
    #[arg(long, default_value_t = 0)]
    duration: u64,
    /// Seconds between stats lines.
    #[arg(long, default_value_t = 5)]
    stats_every: u64,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(support::colour(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kvs_frames=info".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(
        args.fps > 0.0 && args.fps <= 240.0,
        "--fps must be in (0, 240]"
    );

    let registry = kvs_frames::prometheus::Registry::new();
    let source_metrics = FrameSourceMetrics::register(&registry)?;
    if let Some(addr) = &args.metrics {
        let listener = tokio::net::TcpListener::bind(addr)
            .await
            .with_context(|| format!("binding the metrics endpoint {addr}"))?;
        println!("metrics: http://{}/metrics", listener.local_addr()?);
        tokio::spawn(support::serve_metrics(listener, registry.clone()));
    }

    // The emulator lives as long as the service (dropping it stops it).
    let (client, names, _emulator) = if args.stream_names.is_empty() {
        let names: Vec<String> = (1..=args.cameras).map(|i| format!("cam-{i}")).collect();
        let specs: Vec<StreamSpec> = names
            .iter()
            .map(|name| {
                StreamSpec::new(name)
                    .resolution(640, 360)
                    .fps(15)
                    .fragment_duration(Duration::from_secs(1))
            })
            .collect();
        let emulator = tokio::task::spawn_blocking(move || {
            specs
                .into_iter()
                .fold(Emulator::builder(), |b, s| b.stream(s))
                .start()
        })
        .await??;
        println!("embedded KVS emulator: {}", emulator.endpoint());
        (
            KvsClient::new(&emulator.sdk_config()),
            names,
            Some(emulator),
        )
    } else {
        let client = KvsClient::from_env(args.region.as_deref()).await?;
        (client, args.stream_names.clone(), None)
    };

    let set = SourceSet::new();
    for name in &names {
        set.add(
            KvsHlsFrameSource::builder(name, name.clone())
                .client(client.clone())
                .pixel_format(PixelFormat::Rgb)
                .target_fps(args.fps)
                .max_frame_age(Duration::from_secs(3))
                .delivery(DeliveryPolicy::LatestOnly)
                .metrics(source_metrics.clone())
                .build()?,
        )?;
    }
    for (i, uri) in args.uris.iter().enumerate() {
        set.add(
            UriFrameSource::builder(&format!("uri-{}", i + 1), uri)
                .pixel_format(PixelFormat::Rgb)
                .target_fps(args.fps)
                .delivery(DeliveryPolicy::LatestOnly)
                .metrics(source_metrics.clone())
                .build()?,
        )?;
    }

    let stop = {
        let set = set.clone();
        let duration = args.duration;
        async move {
            let limit = async {
                if duration == 0 {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_secs(duration)).await;
            };
            tokio::select! {
                _ = tokio::signal::ctrl_c() => println!("Ctrl+C: stopping every camera"),
                () = limit => println!("--duration elapsed: stopping every camera"),
            }
            set.stop();
        }
    };
    tokio::spawn(stop);

    let mut frames = set.stream();
    let mut last_stats = Instant::now();
    let every = Duration::from_secs(args.stats_every.max(1));
    while let Some((camera, item)) = frames.next().await {
        match item {
            Ok((frame, captured_at)) => detect(&camera, &frame, captured_at),
            // One camera's fatal error ends that camera only.
            Err(err) => tracing::error!(%camera, error = %err, "camera ended"),
        }
        if last_stats.elapsed() >= every {
            print_stats(&set);
            last_stats = Instant::now();
        }
    }
    print_stats(&set);
    Ok(())
}

/// Where a real service would run its model.
fn detect(camera: &str, frame: &kvs_frames::Frame, captured_at: std::time::SystemTime) {
    tracing::debug!(camera, width = frame.width(), height = frame.height(), ?captured_at, age = ?frame.age(), "frame");
}

fn print_stats(set: &SourceSet) {
    for (camera, s) in set.stats() {
        println!(
            "{camera} frames={} dropped={} reconnects={} errors={} state={:?}",
            s.frames_delivered,
            s.frames_dropped(),
            s.reconnects,
            s.read_errors,
            s.state
        );
    }
    let total = set.aggregate_stats();
    println!(
        "all cameras={} healthy={} frames={} dropped={}",
        total.cameras, total.healthy, total.frames_delivered, total.frames_dropped
    );
}
