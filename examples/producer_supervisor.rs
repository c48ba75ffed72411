//! Supervises the RTSP→KVS producers of the cameras listed in a TOML file: prints every state
//! change, a status table every few seconds, serves Prometheus metrics on `/metrics`, and
//! stops every producer gracefully on Ctrl+C or SIGTERM.
//!
//! ```text
//!   cameras.toml ──► Supervisor ──┬─► producer process group per camera
//!                                 │     kvs_gstreamer_sample <stream> <rtsp-url>
//!                                 │     gst-launch-1.0 -e rtspsrc … ! kvssink …
//!                                 │     any command (here: gst-launch … ! fakesink)
//!                                 ├─► events  ─► one line per state change
//!                                 ├─► status  ─► table every N s
//!                                 └─► metrics ─► http://127.0.0.1:9898/metrics
//! ```
//!
//! Without AWS, against the example's own RTSP test server (a live `videotestsrc ! x264enc`
//! camera on 127.0.0.1:8554, user `viewer`, password `s3cr3t`):
//!
//! ```sh
//! cargo run --example producer_supervisor -- \
//!     --config examples/producer_supervisor.toml --test-rtsp-server 8554
//! ```
//!
//! With real KVS: enable the `kvs_gstreamer_sample` or `gst_launch_kvssink` cameras in the
//! TOML file, export the AWS credentials and region, and run without `--test-rtsp-server`.
//! See docs/producer.md.

#[path = "../tests/common/rtsp.rs"]
mod rtsp;

#[path = "support/mod.rs"]
mod support;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use anyhow::{Context, bail};
use clap::Parser;
use kvs_frames::producer::{
    CustomCommand, GstLaunchKvssink, KvsGstreamerSample, OrphanPolicy, ProducerCommand,
    ProducerSpec, ProducerStatus, StopMode, Supervisor,
};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(about = "Supervise RTSP→KVS producers listed in a TOML file")]
struct Args {
    /// The cameras file.
    #[arg(long, default_value = "examples/producer_supervisor.toml")]
    config: PathBuf,
    /// Also serve a live H.264 test camera at rtsp://viewer:s3cr3t@127.0.0.1:PORT/test.
    #[arg(long)]
    test_rtsp_server: Option<u16>,
    /// Stop after this many seconds (for demos and CI); default: run until Ctrl+C.
    #[arg(long)]
    run_for_secs: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    #[serde(default = "default_id")]
    id: String,
    #[serde(default)]
    orphan_policy: Option<String>,
    #[serde(default)]
    metrics: Option<String>,
    #[serde(default = "default_status_every")]
    status_every_secs: u64,
    #[serde(default)]
    camera: Vec<Camera>,
}

fn default_id() -> String {
    "producer-example".to_owned()
}

fn default_status_every() -> u64 {
    5
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Camera {
    stream: String,
    url: String,
    kind: String,
    // kvs_gstreamer_sample
    binary: Option<PathBuf>,
    working_dir: Option<PathBuf>,
    // kvs_gstreamer_sample, gst_launch_kvssink
    region: Option<String>,
    // gst_launch_kvssink
    storage_size_mb: Option<u32>,
    // custom
    program: Option<PathBuf>,
    #[serde(default)]
    args: Vec<String>,
    readiness: Option<String>,
    heartbeat: Option<String>,
    // supervision
    start_secs: Option<u64>,
    stall_timeout_secs: Option<u64>,
    stop_timeout_secs: Option<u64>,
    output_lines: Option<usize>,
    #[serde(default)]
    env: BTreeMap<String, String>,
}

impl Camera {
    fn spec(&self) -> anyhow::Result<ProducerSpec> {
        let command: ProducerCommand = match self.kind.as_str() {
            "kvs_gstreamer_sample" => {
                let mut c = KvsGstreamerSample::new();
                if let Some(binary) = &self.binary {
                    c = c.binary(binary);
                }
                if let Some(dir) = &self.working_dir {
                    c = c.working_dir(dir);
                }
                if let Some(region) = &self.region {
                    c = c.aws_region(region);
                }
                c.into()
            }
            "gst_launch_kvssink" => {
                let mut c = GstLaunchKvssink::new();
                if let Some(region) = &self.region {
                    c = c.aws_region(region);
                }
                if let Some(mb) = self.storage_size_mb {
                    c = c.storage_size_mb(mb);
                }
                c.into()
            }
            "custom" => {
                let Some(program) = &self.program else {
                    bail!("camera {}: kind \"custom\" needs `program`", self.stream);
                };
                let mut c = CustomCommand::new(program, self.args.clone());
                if let Some(dir) = &self.working_dir {
                    c = c.working_dir(dir);
                }
                if let Some(line) = &self.readiness {
                    c = c.readiness_line(line);
                }
                if let Some(line) = &self.heartbeat {
                    c = c.heartbeat_line(line);
                }
                c.into()
            }
            other => bail!(
                "camera {}: unknown kind {other:?} (kvs_gstreamer_sample, gst_launch_kvssink, custom)",
                self.stream
            ),
        };
        let mut spec = ProducerSpec::new(&self.stream, &self.url, command);
        if let Some(s) = self.start_secs {
            spec = spec.start_secs(Duration::from_secs(s));
        }
        if let Some(s) = self.stall_timeout_secs {
            spec = spec.stall_timeout(Some(Duration::from_secs(s)));
        }
        if let Some(s) = self.stop_timeout_secs {
            spec = spec.stop_timeout(Duration::from_secs(s));
        }
        if let Some(n) = self.output_lines {
            spec = spec.output_lines(n);
        }
        for (k, v) in &self.env {
            spec = spec.env(k, v);
        }
        Ok(spec)
    }
}

fn age(t: Option<SystemTime>) -> String {
    t.and_then(|t| t.elapsed().ok())
        .map_or_else(|| "-".to_owned(), |d| format!("{:.1}s", d.as_secs_f64()))
}

fn print_table(statuses: &[ProducerStatus]) {
    println!(
        "{:<16} {:<9} {:>7} {:>8} {:>4} {:>6} {:>8} {:>6}  last error",
        "stream", "state", "pid", "uptime", "rst", "cpu%", "rss MB", "hb"
    );
    for s in statuses {
        let mut error = s.last_error.clone().unwrap_or_default();
        if error.len() > 60 {
            let cut = (0..=60)
                .rev()
                .find(|i| error.is_char_boundary(*i))
                .unwrap_or(0);
            error.truncate(cut);
            error.push('…');
        }
        println!(
            "{:<16} {:<9} {:>7} {:>8} {:>4} {:>6} {:>8} {:>6}  {}",
            s.stream_name,
            s.state.as_str(),
            s.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            s.uptime
                .map_or_else(|| "-".to_owned(), |u| format!("{}s", u.as_secs())),
            s.restarts,
            s.cpu_percent
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.1}")),
            s.rss_bytes.map_or_else(
                || "-".to_owned(),
                |r| format!("{:.1}", r as f64 / 1_048_576.0)
            ),
            age(s.last_heartbeat),
            error
        );
    }
    println!();
}

/// Binds the `/metrics` endpoint and serves it (see `support::serve_metrics`).
async fn serve_metrics(
    addr: String,
    registry: kvs_frames::prometheus::Registry,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(&addr)
        .await
        .with_context(|| format!("binding the metrics endpoint {addr}"))?;
    println!("metrics: http://{addr}/metrics");
    support::serve_metrics(listener, registry).await;
    Ok(())
}

async fn shutdown_signal(run_for: Option<Duration>) {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler");
    let deadline = async {
        match run_for {
            Some(d) => tokio::time::sleep(d).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => println!("\nCtrl+C: stopping every producer"),
        _ = term.recv() => println!("SIGTERM: stopping every producer"),
        () = deadline => println!("--run-for-secs elapsed: stopping every producer"),
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_ansi(support::colour(&std::io::stdout()))
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "kvs_frames=info".into()),
        )
        .init();
    let args = Args::parse();
    let text = std::fs::read_to_string(&args.config)
        .with_context(|| format!("reading {}", args.config.display()))?;
    // The error's own text quotes the offending line, which may hold a camera password: show
    // where it is instead.
    let config: Config = toml::from_str(&text).map_err(|e| {
        let line = e.span().map_or(0, |s| {
            text[..s.start.min(text.len())].lines().count().max(1)
        });
        anyhow::anyhow!(
            "parsing {} (line {line}): {}",
            args.config.display(),
            e.message()
        )
    })?;

    // Optional local camera. Dropped last: the producers are stopped before it goes away.
    let _camera = match args.test_rtsp_server {
        Some(port) => {
            let server = rtsp::RtspServer::builder()
                .port(port)
                .credentials("viewer", "s3cr3t")
                .start()
                .map_err(anyhow::Error::msg)?;
            println!(
                "test camera: rtsp://viewer:***@127.0.0.1:{}/test",
                server.port()
            );
            Some(server)
        }
        None => None,
    };

    let registry = kvs_frames::prometheus::Registry::new();
    let policy = match config.orphan_policy.as_deref() {
        None | Some("kill") => OrphanPolicy::Kill,
        Some("adopt") => OrphanPolicy::Adopt,
        Some("ignore") => OrphanPolicy::Ignore,
        Some(other) => bail!("orphan_policy {other:?}: use kill, adopt or ignore"),
    };
    let supervisor = Supervisor::builder()
        .id(&config.id)
        .orphan_policy(policy)
        .metrics_registry(&registry)
        .build()
        .await?;
    for action in supervisor.orphans() {
        println!(
            "orphan of a previous run: pid {} ({}) → {:?}",
            action.pid,
            action.stream_name.as_deref().unwrap_or("?"),
            action.outcome
        );
    }
    if let Some(addr) = config.metrics.clone() {
        let registry = registry.clone();
        tokio::spawn(async move {
            if let Err(e) = serve_metrics(addr, registry).await {
                eprintln!("metrics endpoint: {e:#}");
            }
        });
    }

    // One line per state change.
    let mut events = supervisor.events();
    tokio::spawn(async move {
        while let Ok(ev) = events.recv().await {
            println!(
                "[{}] {} → {}: {}",
                ev.stream_name, ev.from, ev.to, ev.reason
            );
        }
    });

    let specs = config
        .camera
        .iter()
        .map(Camera::spec)
        .collect::<anyhow::Result<Vec<_>>>()?;
    let report = supervisor.start_all(specs).await;
    println!("started: {:?}", report.succeeded);
    for message in report.error_messages() {
        println!("NOT started: {message}");
    }

    let table = {
        let supervisor = supervisor.clone();
        let every = Duration::from_secs(config.status_every_secs.max(1));
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                print_table(&supervisor.list());
                for s in supervisor.list() {
                    if let Some(health) = supervisor.health(&s.stream_name)
                        && !health.healthy
                    {
                        for issue in &health.issues {
                            println!("  {}: {issue}", s.stream_name);
                        }
                        for rec in &health.recommendations {
                            println!("  {}: try: {rec}", s.stream_name);
                        }
                    }
                }
            }
        })
    };

    shutdown_signal(args.run_for_secs.map(Duration::from_secs)).await;
    table.abort();
    let report = supervisor.stop_all(StopMode::Graceful).await;
    println!("stopped: {:?}", report.succeeded);
    for message in report.error_messages() {
        println!("failed to stop: {message}");
    }
    print_table(&supervisor.list());
    Ok(())
}
