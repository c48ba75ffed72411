//! Reads decoded frames from a KVS stream (or from the embedded emulator), or with `--uri` from
//! an RTSP camera, an HLS URL or a file, and shows what a detector loop gets: frames, producer
//! timestamps, latency, drops, reconnects.
//!
//! ```text
//!   KVS (or the embedded emulator)          KvsHlsFrameSource                           this demo
//!   GetHLSStreamingSessionURL ──▶ playlist ──▶ fragments ──▶ decode (GStreamer) ──▶ frames() ──▶ stats every 10 s
//!                                                                                    ▲     ├──▶ --output jsonl (stdout)
//!   --uri rtsp://… | https://….m3u8 | file     UriFrameSource                         │     ├──▶ --snapshot-dir (PNG, or JPEG)
//!   urisourcebin (rtspsrc | hlsdemux | filesrc) ──▶ decode (GStreamer) ───────────────┘     ├──▶ window (if a display exists)
//!                                                                                          └──▶ --metrics-port (/metrics)
//! ```
//!
//! `make demo` runs it for 20 s against the embedded emulator. Against AWS:
//! `cargo run --example demo_kvs_hls_reader -- --stream-name my-stream --region us-east-1`
//! (add `--getmedia` to read through GetMedia, sub-second behind the camera, instead of HLS);
//! from a camera: `… -- --uri rtsp://user:pass@10.0.0.5/live --duration 30`; from a file at its
//! own pace: `… -- --uri clip.mp4 --realtime`.

#[path = "support/mod.rs"]
mod support;

use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, bail};
use clap::{Parser, ValueEnum};
use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use kvs_emulator::{Emulator, StreamSpec};
use kvs_frames::metrics::FrameSourceMetrics;
use kvs_frames::{
    DeliveryPolicy, Frame, Frames, KvsGetMediaFrameSource, KvsHlsFrameSource, PixelFormat,
    SourceState, SourceStats, UriFrameSource,
};

#[derive(Clone, Copy, Debug, ValueEnum)]
enum Output {
    /// One JSON line per frame on stdout.
    Jsonl,
}

/// `--delivery`: what happens when the reader is slower than the camera.
#[derive(Clone, Copy, Debug, ValueEnum)]
enum Delivery {
    /// The decoder waits for the reader (nothing dropped).
    Block,
    /// The oldest queued frame makes room (the default for LIVE and RTSP).
    DropOldest,
    /// Only the newest frame is kept.
    LatestOnly,
}

impl From<Delivery> for DeliveryPolicy {
    fn from(d: Delivery) -> Self {
        match d {
            Delivery::Block => DeliveryPolicy::Block,
            Delivery::DropOldest => DeliveryPolicy::DropOldest,
            Delivery::LatestOnly => DeliveryPolicy::LatestOnly,
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Decoded frames with producer timestamps from Kinesis Video Streams")]
struct Args {
    /// KVS stream name (or ARN). Without it (and without --uri), the embedded emulator is used.
    #[arg(long)]
    stream_name: Option<String>,
    /// Read this URI with UriFrameSource instead of KVS: rtsp://, rtsps://, http(s)://…m3u8,
    /// file:// or a file path.
    #[arg(long, conflicts_with_all = ["stream_name", "emulator", "region"])]
    uri: Option<String>,
    /// With --uri: deliver a file or HLS VOD at its own pace instead of as fast as it decodes.
    #[arg(long, requires = "uri")]
    realtime: bool,
    /// AWS region (default: the configured one).
    #[arg(long)]
    region: Option<String>,
    /// Camera id used in logs and metrics (default: the stream name, or "uri-camera").
    #[arg(long)]
    camera_id: Option<String>,
    /// Deliver at most this many frames per second.
    #[arg(long)]
    target_fps: Option<f64>,
    /// Stop after this many frames.
    #[arg(long)]
    max_frames: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Pixel format: bgr, rgb, rgba, bgra, gray8, i420, nv12, jpeg or jpeg:QUALITY.
    #[arg(long, default_value = "bgr")]
    pixel_format: String,
    /// How YUV becomes BGR/RGB/BGRA/RGBA: simd (default) or gstreamer (`videoconvert`).
    #[arg(long, default_value = "simd")]
    color_conversion: String,
    /// Threads of each video decoder: auto (default: one per decoder once streams outnumber
    /// cores), libav (libav's own choice), or a number 1-64.
    #[arg(long, default_value = "auto")]
    decoder_threads: String,
    /// Never open a window (default when there is no display).
    #[arg(long)]
    no_display: bool,
    /// Serve Prometheus metrics on 127.0.0.1:PORT/metrics.
    #[arg(long)]
    metrics_port: Option<u16>,
    /// Start the embedded KVS emulator and read from it (the default without --stream-name).
    #[arg(long)]
    emulator: bool,
    /// KVS: read through GetMedia (MKV, frame by frame: sub-second latency) instead of HLS.
    #[arg(long, conflicts_with_all = ["uri", "expires", "max_playlist_fragments"])]
    getmedia: bool,
    /// Per-frame output.
    #[arg(long, value_enum)]
    output: Option<Output>,
    /// Write PNG snapshots (JPEG files with --pixel-format jpeg) into this directory.
    #[arg(long)]
    snapshot_dir: Option<std::path::PathBuf>,
    /// Write a snapshot every N frames (with --snapshot-dir).
    #[arg(long, default_value_t = 100)]
    snapshot_every: u64,
    /// KVS: lifetime of each HLS session in seconds (`Expires`, 300-43200; default 3600). The
    /// session is replaced 30 s before it expires.
    #[arg(long, conflicts_with = "uri")]
    expires: Option<u64>,
    /// KVS: `MaxMediaPlaylistFragmentResults`, 1-5000 (default 30 for LIVE).
    #[arg(long, conflicts_with = "uri")]
    max_playlist_fragments: Option<u32>,
    /// Delivery policy when the reader is slower than the camera (default: drop-oldest for LIVE
    /// and RTSP, block for files and HTTP).
    #[arg(long, value_enum)]
    delivery: Option<Delivery>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_ansi(support::colour(&std::io::stderr()))
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "warn,kvs_frames=info".into()),
        )
        .init();
    match run(Args::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> Result<()> {
    let pixel_format: PixelFormat = args.pixel_format.parse()?;
    let color_conversion: kvs_frames::ColorConversion = args.color_conversion.parse()?;
    let decoder_threads = match args.decoder_threads.as_str() {
        "auto" => kvs_frames::DecoderThreads::Auto,
        "libav" => kvs_frames::DecoderThreads::Libav,
        n => kvs_frames::DecoderThreads::Fixed(n.parse().map_err(|_| {
            anyhow::anyhow!("--decoder-threads: {n:?} is not auto, libav or a number")
        })?),
    };
    if args.snapshot_every == 0 {
        bail!("--snapshot-every must be at least 1");
    }
    if let Some(d) = args.duration
        && !(d.is_finite() && d > 0.0)
    {
        bail!("--duration must be a positive number of seconds, not {d}");
    }
    if let Some(dir) = &args.snapshot_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("cannot create --snapshot-dir {}", dir.display()))?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;

    let registry = kvs_frames::prometheus::Registry::new();
    let metrics = FrameSourceMetrics::register(&registry)?;

    // A URI source, or KVS: the emulator unless a real stream is named.
    let mut emulator = None;
    let source = if let Some(uri) = &args.uri {
        let camera_id = args
            .camera_id
            .clone()
            .unwrap_or_else(|| "uri-camera".to_owned());
        let mut builder = UriFrameSource::builder(&camera_id, uri)
            .pixel_format(pixel_format)
            .color_conversion(color_conversion)
            .decoder_threads(decoder_threads)
            .realtime(args.realtime)
            .metrics(metrics)
            .runtime(runtime.handle().clone());
        if let Some(fps) = args.target_fps {
            builder = builder.target_fps(fps);
        }
        if let Some(d) = args.delivery {
            builder = builder.delivery(d.into());
        }
        let source = builder.build()?;
        eprintln!("reading {} ({})", source.uri(), source.kind().as_str());
        Arc::new(Source::Uri(source))
    } else {
        if args.emulator || args.stream_name.is_none() {
            let started = Emulator::builder()
                .stream(
                    StreamSpec::new("demo-camera")
                        .resolution(1280, 720)
                        .fps(25)
                        .fragment_duration(Duration::from_secs(1)),
                )
                .start()
                .context("starting the embedded KVS emulator")?;
            eprintln!("embedded KVS emulator at {}", started.endpoint());
            if !started.wait_for_fragments("demo-camera", 1, Duration::from_secs(10)) {
                bail!("the emulator's camera produced no fragment");
            }
            emulator = Some(started);
        }
        let stream = args
            .stream_name
            .clone()
            .unwrap_or_else(|| "demo-camera".to_owned());
        let camera_id = args.camera_id.clone().unwrap_or_else(|| stream.clone());
        if args.getmedia {
            let mut builder = KvsGetMediaFrameSource::builder(&camera_id, stream.as_str())
                .pixel_format(pixel_format)
                .color_conversion(color_conversion)
                .decoder_threads(decoder_threads)
                .metrics(metrics.clone())
                .runtime(runtime.handle().clone());
            if let Some(emulator) = &emulator {
                builder = builder.sdk_config(&emulator.sdk_config());
            } else if let Some(region) = &args.region {
                builder = builder.region(region);
            }
            if let Some(fps) = args.target_fps {
                builder = builder.target_fps(fps);
            }
            if let Some(d) = args.delivery {
                builder = builder.delivery(d.into());
            }
            Arc::new(Source::GetMedia(builder.build()?))
        } else {
            let mut builder = KvsHlsFrameSource::builder(&camera_id, stream.as_str())
                .pixel_format(pixel_format)
                .color_conversion(color_conversion)
                .decoder_threads(decoder_threads)
                .metrics(metrics)
                .runtime(runtime.handle().clone());
            if let Some(emulator) = &emulator {
                builder = builder.sdk_config(&emulator.sdk_config());
            } else if let Some(region) = &args.region {
                builder = builder.region(region);
            }
            if let Some(fps) = args.target_fps {
                builder = builder.target_fps(fps);
            }
            if let Some(d) = args.delivery {
                builder = builder.delivery(d.into());
            }
            if let Some(secs) = args.expires {
                builder = builder.expires(Duration::from_secs(secs));
            }
            if let Some(n) = args.max_playlist_fragments {
                builder = builder.max_playlist_fragments(n);
            }
            Arc::new(Source::Kvs(builder.build()?))
        }
    };

    if let Some(port) = args.metrics_port {
        let registry = registry.clone();
        let listener = runtime
            .block_on(tokio::net::TcpListener::bind(("127.0.0.1", port)))
            .with_context(|| format!("cannot listen on 127.0.0.1:{port}"))?;
        eprintln!("metrics at http://127.0.0.1:{port}/metrics");
        runtime.spawn(async move {
            let app = axum::Router::new().route(
                "/metrics",
                axum::routing::get(move || {
                    let registry = registry.clone();
                    async move {
                        let body = kvs_frames::metrics::encode_text(&registry)
                            .unwrap_or_else(|e| format!("# encoding failed: {e}\n"));
                        (
                            [(
                                axum::http::header::CONTENT_TYPE,
                                kvs_frames::metrics::TEXT_CONTENT_TYPE,
                            )],
                            body,
                        )
                    }
                }),
            );
            if let Err(e) = axum::serve(listener, app).await {
                eprintln!("metrics server: {e}");
            }
        });
    }

    // Ctrl+C stops the source; the frame loop then ends.
    let interrupted = Arc::new(AtomicBool::new(false));
    {
        let source = Arc::clone(&source);
        let interrupted = Arc::clone(&interrupted);
        runtime.spawn(async move {
            if tokio::signal::ctrl_c().await.is_ok() {
                interrupted.store(true, Ordering::SeqCst);
                source.stop();
            }
        });
    }

    let mut display = if !args.no_display && std::env::var_os("DISPLAY").is_some() {
        match Display::new() {
            Ok(d) => Some(d),
            Err(e) => {
                eprintln!("no window ({e}); running headless");
                None
            }
        }
    } else {
        None
    };

    let started = Instant::now();
    let deadline = args.duration.map(|d| started + Duration::from_secs_f64(d));
    let mut last_report = Instant::now();
    let mut count = 0u64;
    let mut window_count = 0u64;
    let mut latencies = Latencies::default();
    let stdout = std::io::stdout();
    let mut out = stdout.lock();
    let mut frames = source.frames();
    let mut failure = None;
    loop {
        if deadline.is_some_and(|d| Instant::now() >= d)
            || args.max_frames.is_some_and(|m| count >= m)
        {
            break;
        }
        let item = match frames.next_timeout(Duration::from_millis(500)) {
            Some(item) => item,
            None if interrupted.load(Ordering::SeqCst) => break,
            None if source.state() == SourceState::Error
                || source.state() == SourceState::Disconnected && count > 0 =>
            {
                break;
            }
            None => {
                report_if_due(&source, &mut last_report, &mut window_count, &mut latencies);
                continue;
            }
        };
        let (frame, ts) = match item {
            Ok(pair) => pair,
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        count += 1;
        window_count += 1;
        latencies.note(&frame);
        if let Some(Output::Jsonl) = args.output {
            writeln!(out, "{}", jsonl(&frame, ts)).context("writing to stdout")?;
        }
        if let Some(dir) = &args.snapshot_dir
            && frame.sequence() % args.snapshot_every == 0
        {
            let extension = if frame.format().is_raw() {
                "png"
            } else {
                "jpg"
            };
            let path = dir.join(format!("frame-{:08}.{extension}", frame.sequence()));
            if let Err(e) = snapshot(&frame, &path) {
                eprintln!("snapshot {}: {e:#}", path.display());
            }
        }
        if let Some(d) = display.as_mut()
            && let Err(e) = d.show(&frame)
        {
            eprintln!("display: {e:#}; closing the window");
            display = None;
        }
        report_if_due(&source, &mut last_report, &mut window_count, &mut latencies);
    }
    let stats = source.stats();
    source.stop();
    eprintln!(
        "final: {} latency {}",
        summary(&stats, count, started.elapsed()),
        latencies.total.describe()
    );
    drop(emulator);
    match failure {
        Some(e) => Err(e.into()),
        None => Ok(()),
    }
}

/// Any source: the demo uses the API they share.
enum Source {
    Kvs(KvsHlsFrameSource),
    GetMedia(KvsGetMediaFrameSource),
    Uri(UriFrameSource),
}

/// Emit time − producer time of the frames, per report window and over the run.
#[derive(Default)]
struct Latencies {
    window: Percentiles,
    total: Percentiles,
}

impl Latencies {
    fn note(&mut self, frame: &Frame) {
        if let Some(t) = frame.producer_time()
            && let Ok(d) = frame.emitted_at().duration_since(t)
        {
            self.window.0.push(d);
            self.total.0.push(d);
        }
    }
}

#[derive(Default)]
struct Percentiles(Vec<Duration>);

impl Percentiles {
    fn describe(&mut self) -> String {
        if self.0.is_empty() {
            return "p50=n/a p95=n/a p99=n/a".to_owned();
        }
        self.0.sort_unstable();
        let at = |q: f64| {
            let i = ((self.0.len() as f64 - 1.0) * q).round() as usize;
            self.0[i.min(self.0.len() - 1)].as_secs_f64() * 1000.0
        };
        format!(
            "p50={:.0}ms p95={:.0}ms p99={:.0}ms",
            at(0.50),
            at(0.95),
            at(0.99)
        )
    }
}

impl Source {
    fn frames(&self) -> Frames<'_> {
        match self {
            Source::Kvs(s) => s.frames(),
            Source::GetMedia(s) => s.frames(),
            Source::Uri(s) => s.frames(),
        }
    }
    fn stats(&self) -> SourceStats {
        match self {
            Source::Kvs(s) => s.stats(),
            Source::GetMedia(s) => s.stats(),
            Source::Uri(s) => s.stats(),
        }
    }
    fn state(&self) -> SourceState {
        match self {
            Source::Kvs(s) => s.state(),
            Source::GetMedia(s) => s.state(),
            Source::Uri(s) => s.state(),
        }
    }
    fn camera_id(&self) -> &str {
        match self {
            Source::Kvs(s) => s.camera_id(),
            Source::GetMedia(s) => s.camera_id(),
            Source::Uri(s) => s.camera_id(),
        }
    }
    fn stop(&self) {
        match self {
            Source::Kvs(s) => s.stop(),
            Source::GetMedia(s) => s.stop(),
            Source::Uri(s) => s.stop(),
        }
    }
}

fn report_if_due(source: &Source, last: &mut Instant, window: &mut u64, latencies: &mut Latencies) {
    let elapsed = last.elapsed();
    if elapsed < Duration::from_secs(10) {
        return;
    }
    let stats = source.stats();
    let latency = stats
        .last_frame_producer_time
        .and_then(|t| SystemTime::now().duration_since(t).ok())
        .map_or_else(|| "n/a".to_owned(), |d| format!("{:.2}s", d.as_secs_f64()));
    let producer_time = stats
        .last_frame_producer_time
        .map_or_else(|| "n/a".to_owned(), rfc3339);
    eprintln!(
        "[{}] state={} last_producer_time={producer_time} fps={:.1} frames={} dropped={} fragments={} reconnects={} refreshes={} latency={} queue={} frame_latency {}",
        source.camera_id(),
        stats.state.as_str(),
        *window as f64 / elapsed.as_secs_f64(),
        stats.frames_delivered,
        stats.frames_dropped(),
        stats.fragments_fetched,
        stats.reconnects,
        stats.url_refreshes,
        latency,
        stats.queue_len,
        latencies.window.describe(),
    );
    latencies.window.0.clear();
    *last = Instant::now();
    *window = 0;
}

fn summary(stats: &SourceStats, count: u64, elapsed: Duration) -> String {
    format!(
        "{count} frames in {:.1}s ({:.1} fps), delivered={} dropped={} fragments={} bytes={} sessions={} refreshes={} reconnects={} errors={} skipped={} clock_steps={} sessions_lost={} state={}{}",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64().max(0.001),
        stats.frames_delivered,
        stats.frames_dropped(),
        stats.fragments_fetched,
        stats.bytes_fetched,
        stats.sessions,
        stats.url_refreshes,
        stats.reconnects,
        stats.read_errors,
        stats.fragments_skipped,
        stats.clock_steps,
        stats.sessions_lost,
        stats.state.as_str(),
        stats
            .last_error
            .as_ref()
            .map(|e| format!(" last_error={e}"))
            .unwrap_or_default(),
    )
}

fn rfc3339(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string()
}

fn jsonl(frame: &Frame, ts: SystemTime) -> serde_json::Value {
    let fragment = frame.fragment().map(|f| {
        serde_json::json!({
            "program_date_time": f.program_date_time.map(rfc3339),
            "media_sequence": f.media_sequence,
            "session": f.session,
            "fragment_number": f.fragment_number.as_deref(),
            "server_time": f.server_time.map(rfc3339),
        })
    });
    serde_json::json!({
        "sequence": frame.sequence(),
        "producer_time": frame.producer_time().map(rfc3339),
        "timestamp": rfc3339(ts),
        "timestamp_unix": ts.duration_since(UNIX_EPOCH).map(|d| d.as_secs_f64()).unwrap_or(0.0),
        "pts": frame.pts().map(|d| d.as_secs_f64()),
        "width": frame.width(),
        "height": frame.height(),
        "format": frame.format().as_str(),
        "key_frame": frame.is_key_frame(),
        "fragment": fragment,
    })
}

fn frame_caps(frame: &Frame) -> gst::Caps {
    match frame.format().video_format() {
        Some(format) => gstreamer_video::VideoCapsBuilder::new()
            .format(format)
            .width(frame.width() as i32)
            .height(frame.height() as i32)
            .framerate(gst::Fraction::new(0, 1))
            .build(),
        None => gst::Caps::builder("image/jpeg")
            .field("width", frame.width() as i32)
            .field("height", frame.height() as i32)
            .field("framerate", gst::Fraction::new(0, 1))
            .build(),
    }
}

/// Encodes one frame as PNG with `appsrc ! videoconvert ! pngenc ! filesink`; a JPEG frame is
/// written as it is.
fn snapshot(frame: &Frame, path: &std::path::Path) -> Result<()> {
    if !frame.format().is_raw() {
        std::fs::write(path, frame.data())?;
        return Ok(());
    }
    let pipeline = gst::Pipeline::new();
    let src = gst_app::AppSrc::builder()
        .caps(&frame_caps(frame))
        .format(gst::Format::Time)
        .build();
    let convert = gst::ElementFactory::make("videoconvert").build()?;
    let png = gst::ElementFactory::make("pngenc")
        .property("snapshot", true)
        .build()?;
    let sink = gst::ElementFactory::make("filesink")
        .property("location", path.to_string_lossy().as_ref())
        .build()?;
    pipeline.add_many([src.upcast_ref(), &convert, &png, &sink])?;
    gst::Element::link_many([src.upcast_ref(), &convert, &png, &sink])?;
    pipeline.set_state(gst::State::Playing)?;
    src.push_buffer(frame.buffer().to_owned())?;
    src.end_of_stream()?;
    let bus = pipeline.bus().context("no bus")?;
    let msg = bus.timed_pop_filtered(
        gst::ClockTime::from_seconds(10),
        &[gst::MessageType::Eos, gst::MessageType::Error],
    );
    pipeline.set_state(gst::State::Null)?;
    match msg.as_ref().map(|m| m.view()) {
        Some(gst::MessageView::Eos(_)) => Ok(()),
        Some(gst::MessageView::Error(e)) => bail!("{}", e.error()),
        _ => bail!("timed out"),
    }
}

/// A window: `appsrc ! videoconvert ! autovideosink`, fed with the frames' buffers (no copy).
struct Display {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    caps: Option<gst::Caps>,
}

impl Display {
    fn new() -> Result<Self> {
        let pipeline = gst::Pipeline::new();
        let src = gst_app::AppSrc::builder()
            .format(gst::Format::Time)
            .is_live(true)
            .build();
        // decodebin passes raw video through and decodes JPEG frames.
        let decode = gst::ElementFactory::make("decodebin").build()?;
        let convert = gst::ElementFactory::make("videoconvert").build()?;
        let sink = gst::ElementFactory::make("autovideosink")
            .property("sync", false)
            .build()?;
        pipeline.add_many([src.upcast_ref(), &decode, &convert, &sink])?;
        src.link(&decode)?;
        gst::Element::link_many([&convert, &sink])?;
        let convert_sink = convert
            .static_pad("sink")
            .context("videoconvert sink pad")?;
        decode.connect_pad_added(move |_, pad| {
            if !convert_sink.is_linked() {
                let _ = pad.link(&convert_sink);
            }
        });
        pipeline.set_state(gst::State::Playing)?;
        Ok(Display {
            pipeline,
            src,
            caps: None,
        })
    }

    fn show(&mut self, frame: &Frame) -> Result<()> {
        let caps = frame_caps(frame);
        if self.caps.as_ref() != Some(&caps) {
            self.src.set_caps(Some(&caps));
            self.caps = Some(caps);
        }
        self.src.push_buffer(frame.buffer().to_owned())?;
        Ok(())
    }
}

impl Drop for Display {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}
