//! A standalone local Kinesis Video Streams, for any KVS client: the AWS CLI, boto3, the AWS
//! SDKs, an HLS player.
//!
//! ```text
//!   synthetic camera per stream                       127.0.0.1:PORT
//!   (frame number + time drawn in the picture)   ┌──────────────────────────────┐
//!   appsrc → textoverlay → x264enc → h264parse ──▶│ fragments (fMP4, 1 GOP each) │
//!                                                 │ control plane  (REST-JSON)   │◀── aws kinesisvideo …
//!                                                 │ GetHLSStreamingSessionURL    │◀── boto3 / SDK
//!                                                 │ HLS playlists + fragments    │◀── playbin / ffplay
//!                                                 │ GetClip (MP4)                │
//!                                                 └──────────────────────────────┘
//! ```
//!
//! Install it with `cargo install --path emulator` and run `kvs-emulator`, or run it from the
//! workspace with `make emulator` or
//! `cargo run -p kvs-emulator -- --port 4566 --stream cam-1:1280x720@25`, then, for example:
//!
//! ```text
//! export AWS_ACCESS_KEY_ID=AKIDKVSFRAMESEMULATOR AWS_SECRET_ACCESS_KEY=x AWS_DEFAULT_REGION=us-east-1
//! aws --endpoint-url http://127.0.0.1:4566 kinesisvideo list-streams
//! gst-launch-1.0 playbin uri="<the session URL it prints>"
//! ```

use std::time::Duration;

use anyhow::{Context, Result, bail};
use aws_sdk_kinesisvideo::types::ApiName;
use aws_sdk_kinesisvideoarchivedmedia::types::{
    HlsDiscontinuityMode, HlsDisplayFragmentTimestamp, HlsFragmentSelector,
    HlsFragmentSelectorType, HlsPlaybackMode,
};
use clap::Parser;
use kvs_emulator::{Emulator, FrameRate, OPERATIONS, Refusal, StreamSpec};

#[derive(Parser, Debug)]
#[command(about = "A local Kinesis Video Streams emulator (control plane, HLS, GetClip)")]
struct Args {
    /// Port on 127.0.0.1 (0 = any free port).
    #[arg(long, default_value_t = 4566)]
    port: u16,
    /// A stream: NAME or NAME:WIDTHxHEIGHT or NAME:WIDTHxHEIGHT@FPS (FPS: N, or NUM/DEN such as
    /// 30000/1001 for 29.97). Repeat for more streams.
    #[arg(long = "stream", default_value = "demo-camera:1280x720@25")]
    streams: Vec<String>,
    /// Fragment (GOP) duration in seconds.
    #[arg(long, default_value_t = 2.0)]
    fragment_duration: f64,
    /// Seconds of archived video each stream has at start (for ON_DEMAND / GetClip).
    #[arg(long, default_value_t = 0)]
    history: u64,
    /// Region reported in ARNs.
    #[arg(long, default_value = "us-east-1")]
    region: String,
    /// Do not create and print a LIVE HLS session URL for each stream at start.
    #[arg(long)]
    no_session_url: bool,
    /// Refuse an API operation, as an IAM policy without it would: NAME (403
    /// AccessDeniedException) or NAME:404 (UnknownOperationException). Repeat for more.
    #[arg(long = "refuse-api", value_name = "NAME[:403|:404]")]
    refuse_api: Vec<String>,
}

/// `NAME`, `NAME:403` or `NAME:404` of `--refuse-api`.
fn parse_refusal(text: &str) -> Result<(&str, Refusal)> {
    let (name, how) = text.split_once(':').unwrap_or((text, "403"));
    let refusal = Refusal::parse(how)
        .with_context(|| format!("bad --refuse-api {text:?}: after NAME: 403 or 404"))?;
    if !OPERATIONS.contains(&name) {
        bail!(
            "bad --refuse-api {text:?}: {name:?} is not one of {}",
            OPERATIONS.join(", ")
        );
    }
    Ok((name, refusal))
}

fn parse_stream(text: &str, fragment: Duration, history: Duration) -> Result<StreamSpec> {
    let (name, rest) = match text.split_once(':') {
        Some((name, rest)) => (name, Some(rest)),
        None => (text, None),
    };
    let mut spec = StreamSpec::new(name)
        .fragment_duration(fragment)
        .history(history);
    if let Some(rest) = rest {
        let (size, fps) = match rest.split_once('@') {
            Some((size, fps)) => (size, Some(fps)),
            None => (rest, None),
        };
        let (w, h) = size.split_once('x').with_context(|| {
            format!("bad size {size:?} in --stream {text:?}: expected WIDTHxHEIGHT")
        })?;
        spec = spec.resolution(
            w.parse()
                .with_context(|| format!("bad width {w:?} in --stream {text:?}"))?,
            h.parse()
                .with_context(|| format!("bad height {h:?} in --stream {text:?}"))?,
        );
        if let Some(fps) = fps {
            let bad = || format!("bad fps {fps:?} in --stream {text:?}: N or NUM/DEN (30000/1001)");
            let rate = match fps.split_once('/') {
                Some((num, den)) => FrameRate {
                    num: num.parse().with_context(bad)?,
                    den: den.parse().with_context(bad)?,
                },
                None => FrameRate::integer(fps.parse().with_context(bad)?),
            };
            spec = spec.frame_rate(rate);
        }
    }
    Ok(spec)
}

/// Whether log lines written to `stream` may carry ANSI colours: only on a terminal, and never
/// when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
fn colour(stream: &impl std::io::IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

/// The program: parses the command line, starts the emulator, prints its endpoints and a LIVE
/// session URL per stream, and serves until Ctrl+C.
#[tokio::main]
pub async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(colour(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    if !(0.1..=20.0).contains(&args.fragment_duration) {
        bail!(
            "--fragment-duration {} is out of range 0.1..=20",
            args.fragment_duration
        );
    }
    let fragment = Duration::from_secs_f64(args.fragment_duration);
    let history = Duration::from_secs(args.history);
    let mut builder = Emulator::builder().port(args.port).region(&args.region);
    let mut names = Vec::new();
    for text in &args.streams {
        let spec = parse_stream(text, fragment, history)?;
        names.push(text.split(':').next().unwrap_or(text).to_owned());
        builder = builder.stream(spec);
    }
    for text in &args.refuse_api {
        let (operation, refusal) = parse_refusal(text)?;
        builder = builder.refuse_api(operation, refusal);
    }
    let emulator = tokio::task::spawn_blocking(move || builder.start())
        .await
        .context("emulator start task")??;
    println!(
        "KVS emulator listening on {} (data endpoint {})",
        emulator.endpoint(),
        emulator.data_endpoint()
    );
    println!(
        "  credentials: AWS_ACCESS_KEY_ID={} AWS_SECRET_ACCESS_KEY=<any> AWS_DEFAULT_REGION={}",
        kvs_emulator::ACCESS_KEY_ID,
        emulator.region()
    );
    println!("  streams: {}", names.join(", "));

    if !args.no_session_url {
        let config = emulator.sdk_config();
        let control = aws_sdk_kinesisvideo::Client::new(&config);
        for name in &names {
            let wait = fragment + Duration::from_secs(5) + history;
            let ready = {
                let deadline = tokio::time::Instant::now() + wait;
                loop {
                    if !emulator.ground_truth(name).is_empty() {
                        break true;
                    }
                    if tokio::time::Instant::now() > deadline {
                        break false;
                    }
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            };
            if !ready {
                bail!("stream {name} published no fragment within {wait:?}");
            }
            let endpoint = control
                .get_data_endpoint()
                .stream_name(name)
                .api_name(ApiName::GetHlsStreamingSessionUrl)
                .send()
                .await
                .with_context(|| format!("GetDataEndpoint for {name}"))?;
            let media_config = aws_sdk_kinesisvideoarchivedmedia::config::Builder::from(&config)
                .endpoint_url(endpoint.data_endpoint().unwrap_or_default())
                .build();
            let media = aws_sdk_kinesisvideoarchivedmedia::Client::from_conf(media_config);
            let session = media
                .get_hls_streaming_session_url()
                .stream_name(name)
                .playback_mode(HlsPlaybackMode::Live)
                .hls_fragment_selector(
                    HlsFragmentSelector::builder()
                        .fragment_selector_type(HlsFragmentSelectorType::ProducerTimestamp)
                        .build(),
                )
                .discontinuity_mode(HlsDiscontinuityMode::OnDiscontinuity)
                .display_fragment_timestamp(HlsDisplayFragmentTimestamp::Always)
                .expires(43_200)
                .send()
                .await
                .with_context(|| format!("GetHLSStreamingSessionURL for {name}"))?;
            // Printing the session URL is the point of this example: it is a local test token.
            println!(
                "  {name}: LIVE session URL (valid 12 h):\n    {}",
                session.hls_streaming_session_url().unwrap_or_default()
            );
        }
    }
    println!("Ctrl+C stops the emulator.");
    tokio::signal::ctrl_c()
        .await
        .context("waiting for Ctrl+C")?;
    tokio::task::spawn_blocking(move || emulator.shutdown())
        .await
        .context("emulator shutdown")?;
    Ok(())
}
