//! Real producers against a real RTSP server: `gst-launch-1.0 rtspsrc … ! rtph264depay !
//! h264parse ! fakesink` through `CustomCommand`, and a camera that goes away and comes back.

#[path = "common/rtsp.rs"]
mod rtsp;

use std::time::Duration;

use kvs_frames::producer::{
    CustomCommand, ProducerSpec, ProducerState, RestartPolicy, RestartReason, StopMode, Supervisor,
};
use rtsp::RtspServer;

const T: Duration = Duration::from_secs(30);

/// `gst-launch-1.0 -v` prints fakesink's `last-message` for every buffer: a real heartbeat.
const BUFFER_LINE: &str = "last-message = chain";

fn gst_producer(name: &str, url: &str) -> ProducerSpec {
    ProducerSpec::new(
        name,
        url,
        CustomCommand::new(
            "gst-launch-1.0",
            [
                "-v",
                "rtspsrc",
                "location={url}",
                "protocols=tcp",
                "timeout=2000000",
                "!",
                "rtph264depay",
                "!",
                "h264parse",
                "!",
                "fakesink",
                "silent=false",
                "sync=false",
            ],
        )
        .readiness_line(BUFFER_LINE)
        .heartbeat_line(BUFFER_LINE),
    )
    .start_secs(Duration::from_secs(15))
    .stall_timeout(Some(Duration::from_secs(3)))
    .stop_timeout(Duration::from_secs(5))
    // Few lines kept: every buffer prints one.
    .output_lines(100)
    .restart_policy(
        RestartPolicy::default()
            .initial_delay(Duration::from_millis(300))
            .max_delay(Duration::from_secs(1))
            .jitter(0.8, 1.2)
            .start_limit(None),
    )
}

async fn supervisor(tag: &str) -> Supervisor {
    Supervisor::builder()
        .id(format!("test-{tag}-{}", std::process::id()))
        .stats_interval(Duration::from_millis(250))
        .build()
        .await
        .expect("supervisor")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gst_launch_producer_survives_a_camera_restart() {
    let server = RtspServer::builder()
        .credentials("viewer", "s3cr3t-pw")
        .start()
        .expect("RTSP server");
    let port = server.port();
    let url = server.url_with_credentials();
    let sup = supervisor("rtsp").await;
    let mut events = sup.events();
    let first = sup.start(gst_producer("cam-rtsp", &url)).await.unwrap();
    let pid1 = first.pid.unwrap();
    let running = sup
        .wait_for_state("cam-rtsp", ProducerState::Running, T)
        .await
        .unwrap();
    assert_eq!(running.state_reason, "printed its readiness line");
    assert_eq!(
        running.rtsp_url,
        format!("rtsp://viewer:***@127.0.0.1:{port}/test")
    );

    // The camera goes away: rtspsrc fails (or goes silent and the watchdog fires).
    server.stop();
    let ev = loop {
        let ev = events.recv().await.unwrap();
        eprintln!("event: {} -> {}: {}", ev.from, ev.to, ev.reason);
        if ev.to == ProducerState::Backoff {
            break ev;
        }
    };
    assert!(
        matches!(
            ev.restart_reason,
            Some(RestartReason::ExitFailure | RestartReason::Stall | RestartReason::ExitSuccess)
        ),
        "{ev:?}"
    );
    // While it is away, new starts fail and are retried with backoff.
    let during = sup
        .wait_until("cam-rtsp", T, |s| s.restarts >= 3)
        .await
        .unwrap();
    assert!(during.consecutive_restarts >= 3, "{during:?}");
    assert_ne!(during.state, ProducerState::Fatal);

    // The camera comes back on the same port: Running again, heartbeats flowing.
    let server = RtspServer::builder()
        .credentials("viewer", "s3cr3t-pw")
        .port(port)
        .start_retrying(Duration::from_secs(10))
        .expect("RTSP server restarts on the same port");
    let back = sup
        .wait_until("cam-rtsp", Duration::from_secs(45), |s| {
            s.state == ProducerState::Running
                && s.pid.is_some_and(|p| p != pid1)
                && s.last_heartbeat.is_some()
        })
        .await
        .unwrap();
    assert!(back.restarts >= 3);
    while let Ok(ev) = events.try_recv() {
        eprintln!("event: {} -> {}: {}", ev.from, ev.to, ev.reason);
    }
    assert!(
        sup.health("cam-rtsp")
            .unwrap()
            .issues
            .iter()
            .all(|i| !i.contains("s3cr3t"))
    );
    for line in sup.output("cam-rtsp").unwrap() {
        assert!(!line.text.contains("s3cr3t-pw"), "{line:?}");
    }
    let stopped = sup.stop("cam-rtsp", StopMode::Graceful).await.unwrap();
    assert_eq!(stopped.state, ProducerState::Stopped);
    // gst-launch handles SIGINT (it stops the pipeline and exits).
    assert!(stopped.last_exit.unwrap().requested);
    drop(server);
}
