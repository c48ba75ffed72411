//! The camera password and AWS secrets never reach the logs, statuses, events, health, errors
//! or `Debug` output of the producer supervisor. Logs are captured from a global `tracing`
//! subscriber at TRACE level (which includes every output line of the producers), so this
//! file holds a single test.

mod producer_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvs_frames::producer::{
    GstLaunchKvssink, KvsGstreamerSample, ProducerSpec, ProducerState, StopMode,
};
use producer_support::*;

const AWS_SECRET: &str = "wJalrXUtnFEMIK7MDENGbPxRfiCYzzSECRET";

#[derive(Clone, Default)]
struct Captured(Arc<Mutex<Vec<u8>>>);

impl Write for Captured {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Captured {
    type Writer = Captured;
    fn make_writer(&'a self) -> Self::Writer {
        self.clone()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secrets_never_reach_logs_status_events_errors_or_debug() {
    let logs = Captured::default();
    tracing::subscriber::set_global_default(
        tracing_subscriber::fmt()
            .with_max_level(tracing::Level::TRACE)
            .with_ansi(false)
            .with_writer(logs.clone())
            .finish(),
    )
    .unwrap();

    let dir = SdkDir::new("redaction");
    let sup = supervisor("redaction").await;
    let mut events = sup.events();
    let mut seen = Vec::new();

    // Errors: an invalid scheme, a bad binary, a URL that does not parse.
    let errors = [
        ProducerSpec::new(
            "cam-1",
            format!("http://admin:{PASSWORD}@cam/x"),
            KvsGstreamerSample::new().binary(fake_script()),
        ),
        ProducerSpec::new(
            "cam-1",
            SECRET_URL,
            KvsGstreamerSample::new().binary("/nonexistent"),
        ),
        ProducerSpec::new(
            "cam-1",
            format!("admin:{PASSWORD}@cam"),
            GstLaunchKvssink::new(),
        ),
    ];
    for spec in errors {
        seen.push(format!("{spec:?}"));
        let err = sup.start(spec).await.unwrap_err();
        seen.push(format!("{err} {err:?}"));
    }

    // A producer that prints its URL, fails, restarts and is stopped.
    let spec = fake_spec("cam-1", &dir).env("AWS_SECRET_ACCESS_KEY", AWS_SECRET);
    seen.push(format!("{spec:?}"));
    let status = sup.start(spec).await.unwrap();
    seen.push(format!("{status:?}"));
    sup.wait_for_state("cam-1", ProducerState::Running, Duration::from_secs(20))
        .await
        .unwrap();
    dir.command("cam-1", "exit0");
    sup.wait_until("cam-1", Duration::from_secs(20), |s| {
        s.restarts == 1 && s.state == ProducerState::Running
    })
    .await
    .unwrap();
    seen.push(format!("{:?}", sup.status("cam-1")));
    seen.push(format!("{:?}", sup.list()));
    seen.push(format!("{:?}", sup.health("cam-1")));
    seen.push(format!("{:?}", sup.output("cam-1")));
    sup.stop("cam-1", StopMode::Graceful).await.unwrap();
    while let Ok(ev) = events.try_recv() {
        seen.push(format!("{ev:?}"));
    }
    seen.push(format!("{sup:?}"));

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The logs did carry the URLs (redacted) and the producer's output lines.
    assert!(logs.contains("rtsp://admin:***@127.0.0.1:8554"), "{logs}");
    assert!(logs.contains("Streaming from rtsp source"), "{logs}");
    assert!(logs.contains("Terminating pipeline"), "{logs}");
    let everything = format!("{logs}\n{}", seen.join("\n"));
    assert!(
        !everything.contains(PASSWORD),
        "the camera password leaked:\n{everything}"
    );
    assert!(
        !everything.contains(AWS_SECRET),
        "the AWS secret leaked:\n{everything}"
    );
}
