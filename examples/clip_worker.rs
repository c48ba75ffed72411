//! Live-to-batch: every N seconds, for every ACTIVE camera, the last N seconds as an MP4 file
//! (plus a JPEG of its first frame), for batch analysis downstream.
//!
//! ```text
//!  every N s ──▶ Discovery::active_streams()           ListStreams, all pages, cached 5 min
//!                  │  for each stream (4 at a time)
//!                  ▼
//!               ClipExtractor::extract_to_file()       ListFragments → GetClip per ≤200 fragments
//!                  │                                   (GetClip alone where ListFragments is refused)
//!                  │                                   → qtdemux → mp4mux (no re-encoding)
//!                  ▼
//!               OUT/live/{stream}/{window start}.mp4   written aside, renamed when complete
//!               OUT/live/{stream}/{window start}.jpg
//!                  │
//!                  ▼
//!               retention::sweep(OUT/live, --keep)     old clips deleted after each round
//! ```
//!
//! Windows are back to back — `[t, t+N)`, `[t+N, t+2N)`, … — and lag `--lag` seconds behind
//! real time so that the window's fragments are complete and listed (ListFragments is eventually
//! consistent). Each fragment goes to exactly one clip: the one in which it starts. A stream that
//! fails (no fragments in the window, not ACTIVE any more, throttled past the retries) is logged
//! and skipped until the next round. Ctrl+C stops at once; a clip being written is abandoned
//! without leaving a partial file.
//!
//! By default it runs against an embedded emulator (two cameras and one without media, to show a
//! per-stream failure):
//!
//! ```text
//! cargo run --example clip_worker -- --interval 10 --out /tmp/clips
//! cargo run --example clip_worker -- --interval 10 --out /tmp/clips --deny-list-fragments
//! cargo run --example clip_worker -- --aws --region eu-west-1 --prefix cam-
//! ```

#[path = "support/mod.rs"]
mod support;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use clap::Parser;
use futures_util::StreamExt as _;
use kvs_emulator::{Emulator, Refusal, StreamSpec};
use kvs_frames::kvs::{
    ClipExtractor, ClipOptions, ClipRequest, Discovery, DiscoveryOptions, KvsClient,
};
use kvs_frames::retention;
use tracing::{info, warn};

#[derive(Parser, Debug)]
#[command(about = "Every N seconds, the last N seconds of every ACTIVE KVS stream as MP4 files")]
struct Args {
    /// Output directory; clips go to OUT/live/{stream}/{start}.mp4.
    #[arg(long, default_value = "clips")]
    out: PathBuf,
    /// Clip length and period, in seconds.
    #[arg(long, default_value_t = 60)]
    interval: u64,
    /// How far behind real time a window ends, in seconds.
    #[arg(long, default_value_t = 5)]
    lag: u64,
    /// Only streams whose name starts with this.
    #[arg(long)]
    prefix: Option<String>,
    /// No JPEG thumbnails.
    #[arg(long)]
    no_thumbnails: bool,
    /// Delete clips older than this many hours after each round (0: never).
    #[arg(long, default_value_t = 24)]
    keep_hours: u64,
    /// Clips extracted at the same time.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Stop after this many rounds (0: run until Ctrl+C).
    #[arg(long, default_value_t = 0)]
    rounds: u64,
    /// Use real AWS (credentials and region from the environment) instead of the emulator.
    #[arg(long)]
    aws: bool,
    /// AWS region (with --aws).
    #[arg(long)]
    region: Option<String>,
    /// Cameras of the embedded emulator.
    #[arg(long, default_value_t = 2)]
    cameras: u32,
    /// The embedded emulator refuses ListFragments (403 AccessDeniedException), as an IAM
    /// policy with GetClip but not ListFragments would: clips are made with GetClip alone.
    #[arg(long)]
    deny_list_fragments: bool,
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(support::colour(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "info,kvs_frames=info".into()),
        )
        .init();
    let args = Args::parse();
    anyhow::ensure!(args.interval > 0, "--interval must be at least 1 s");
    anyhow::ensure!(args.concurrency > 0, "--concurrency must be at least 1");
    let interval = Duration::from_secs(args.interval);
    let lag = Duration::from_secs(args.lag);

    // The emulator lives as long as the worker (dropping it stops it).
    let (client, _emulator) = if args.aws {
        let client = KvsClient::from_env(args.region.as_deref())
            .await
            .context("AWS configuration")?;
        (client, None)
    } else {
        let emulator = start_emulator(&args, interval + lag)?;
        info!(endpoint = emulator.endpoint(), "embedded KVS emulator");
        (KvsClient::new(&emulator.sdk_config()), Some(emulator))
    };

    let mut discovery_options = DiscoveryOptions::default().ttl(Duration::from_secs(300));
    if let Some(prefix) = &args.prefix {
        discovery_options = discovery_options.name_prefix(prefix);
    }
    let discovery = Discovery::new(client.clone(), discovery_options.stale_on_error(true))?;
    // Streams come from discovery (ACTIVE only): no DescribeStream per clip.
    let clips = Arc::new(ClipExtractor::new(
        client,
        ClipOptions::default().check_stream_status(false),
    )?);
    let live = args.out.join("live");
    std::fs::create_dir_all(&live).with_context(|| format!("creating {}", live.display()))?;

    let mut window_end = whole_seconds(SystemTime::now() - lag);
    let mut round = 0u64;
    loop {
        let window_start = window_end - interval;
        round += 1;
        let work = run_round(&args, &discovery, &clips, &live, window_start, window_end);
        tokio::select! {
            result = work => {
                if let Err(err) = result {
                    warn!(error = %err, "round failed");
                }
            }
            _ = tokio::signal::ctrl_c() => {
                info!("Ctrl+C: stopping (clips in progress are abandoned, no partial files)");
                break;
            }
        }
        if args.keep_hours > 0 {
            let dir = live.clone();
            let keep = Duration::from_secs(args.keep_hours * 3600);
            match tokio::task::spawn_blocking(move || retention::sweep(&dir, keep, false)).await? {
                Ok(report) if report.deleted_count() > 0 || !report.errors.is_empty() => info!(
                    deleted = report.deleted_count(),
                    bytes = report.deleted_bytes,
                    errors = report.errors.len(),
                    "retention sweep"
                ),
                Ok(_) => {}
                Err(err) => warn!(error = %err, "retention sweep failed"),
            }
        }
        if args.rounds > 0 && round >= args.rounds {
            info!(rounds = round, "done");
            break;
        }

        window_end += interval;
        let now = SystemTime::now();
        if window_end + lag + 3 * interval < now {
            warn!("more than three windows behind: skipping ahead");
            window_end = whole_seconds(now - lag);
        }
        let wait = (window_end + lag).duration_since(now).unwrap_or_default();
        tokio::select! {
            _ = tokio::time::sleep(wait) => {}
            _ = tokio::signal::ctrl_c() => {
                info!("Ctrl+C: stopping");
                break;
            }
        }
    }
    Ok(())
}

/// One window for every ACTIVE stream, `concurrency` at a time; per-stream failures are logged.
async fn run_round(
    args: &Args,
    discovery: &Discovery,
    clips: &Arc<ClipExtractor>,
    live: &Path,
    start: SystemTime,
    end: SystemTime,
) -> Result<()> {
    let streams = discovery.active_streams().await.context("discovery")?;
    if streams.is_stale() {
        warn!("using the stream list of {:?} ago", streams.age());
    }
    let started = Instant::now();
    let results: Vec<bool> = futures_util::stream::iter(streams.iter().cloned())
        .map(|stream| {
            let clips = Arc::clone(clips);
            let path = live
                .join(&stream.name)
                .join(format!("{}.mp4", file_time(start)));
            // [start, end): a fragment starting exactly at `end` belongs to the next window.
            let request =
                ClipRequest::new(stream.name.clone(), start, end - Duration::from_millis(1))
                    .include_fragment_at_start(false)
                    .thumbnail(!args.no_thumbnails);
            async move {
                let t0 = Instant::now();
                match clips.extract_to_file(&request, &path).await {
                    Ok(clip) => {
                        info!(
                            stream = %stream.name,
                            path = %path.display(),
                            ms = t0.elapsed().as_millis() as u64,
                            fragments = clip.fragments,
                            frames = clip.frames,
                            bytes = clip.size_bytes,
                            get_clip_calls = clip.get_clip_calls,
                            thumbnail = clip.thumbnail_path.is_some(),
                            "clip"
                        );
                        true
                    }
                    Err(err) => {
                        warn!(
                            stream = %stream.name,
                            kind = err.kind().as_str(),
                            ms = t0.elapsed().as_millis() as u64,
                            error = %err,
                            "clip skipped"
                        );
                        false
                    }
                }
            }
        })
        .buffer_unordered(args.concurrency)
        .collect()
        .await;
    let ok = results.iter().filter(|ok| **ok).count();
    info!(
        window = %file_time(start),
        streams = results.len(),
        ok,
        failed = results.len() - ok,
        ms = started.elapsed().as_millis() as u64,
        "round"
    );
    Ok(())
}

fn start_emulator(args: &Args, needed: Duration) -> Result<Emulator> {
    // Enough archive for the first window at once.
    let history = needed + Duration::from_secs(10);
    let mut builder = Emulator::builder();
    for i in 1..=args.cameras {
        builder = builder.stream(
            StreamSpec::new(format!("cam-{i}"))
                .resolution(640, 360)
                .fps(15)
                .fragment_duration(Duration::from_secs(2))
                .bitrate_kbps(500)
                .history(history),
        );
    }
    // ACTIVE but never sends anything: its clips fail with NoFragments, the others go on.
    builder = builder.stream(StreamSpec::new("cam-silent").camera(false));
    if args.deny_list_fragments {
        builder = builder.refuse_api("ListFragments", Refusal::AccessDenied);
    }
    let emulator = builder.start().context("starting the emulator")?;
    // The archive is encoded at start, as fast as possible: wait for it (a few seconds).
    let fragments = usize::try_from(history.as_secs() / 2).unwrap_or(1);
    for i in 1..=args.cameras {
        emulator.wait_for_fragments(&format!("cam-{i}"), fragments, Duration::from_secs(120));
    }
    Ok(emulator)
}

fn whole_seconds(t: SystemTime) -> SystemTime {
    let secs = t
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    UNIX_EPOCH + Duration::from_secs(secs)
}

fn file_time(t: SystemTime) -> String {
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    dt.format("%Y%m%dT%H%M%SZ").to_string()
}
