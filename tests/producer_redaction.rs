//! The camera password, AWS secrets and every password form of a producer command line
//! (`user-pw`/`secret-key` properties, `--password=…`, `--token …`, `pw=`, `secret=`,
//! environment values, URL passwords and query tokens) never reach the logs, statuses,
//! events, health, errors, metrics or `Debug` output of the producer supervisor. Logs are captured from a global `tracing`
//! subscriber at TRACE level (which includes every output line of the producers), so this
//! file holds a single test.

mod producer_support;

use std::io::Write;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvs_frames::producer::{
    CustomCommand, GstLaunchKvssink, KvsGstreamerSample, ProducerSpec, ProducerState, StartLimit,
    StopMode, Supervisor,
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

/// One secret per form the issue lists, each distinct so that a leak names its form.
const GST_USER_PW: &str = "PwGstUserPw1";
const KVSSINK_SECRET_KEY: &str = "PwKvsSecret2";
const ARG_EQ: &str = "PwArgEq3";
const ARG_SEPARATE: &str = "PwArgSep4";
const ARG_WITH_SPACE: &str = "PwArg Spaced5";
const ARG_PW: &str = "PwShort6";
const ARG_SECRET: &str = "PwSecret7";
const ENV_PASSWORD: &str = "PwEnv8";
const URL_PASSWORD: &str = "PwUrl9";
const URL_TOKEN: &str = "PwQuery10";
const ERROR_VALUE: &str = "PwErr11";
const TEMPLATE_VALUE: &str = "PwTpl12";
const ARG_USER_PW: &str = "PwCustUserPw13";
/// A secret the supervisor does not know, printed by the producer in a `key: value` form.
const PRINTED: &str = "PwPrinted14";

/// A custom producer that prints its arguments (together and one by one) and environment,
/// then fails.
const PRINTER: &str = r#"echo "args: $*"; for a in "$@"; do echo "arg: $a"; done; echo "CAMERA_PASSWORD=$CAMERA_PASSWORD"; echo "raw $CAMERA_PASSWORD and $AWS_SECRET_ACCESS_KEY"; echo "login password: PwPrinted14 ok"; echo "error: giving up" >&2; sleep 0.2; exit 3"#;

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
    let registry = kvs_frames::prometheus::Registry::new();
    let sup = Supervisor::builder()
        .id(format!("test-redaction-{}", std::process::id()))
        .stats_interval(Duration::from_millis(200))
        .metrics_registry(&registry)
        .build()
        .await
        .unwrap();
    let mut events = sup.events();
    let mut seen = Vec::new();

    // Errors: an invalid scheme, a bad binary, a URL that does not parse, a secret property
    // value that is invalid, a template typo next to a secret.
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
        ProducerSpec::new(
            "cam-1",
            "rtsp://cam/x",
            GstLaunchKvssink::new()
                .gst_launch("/bin/echo")
                .rtspsrc_property("user-pw", format!("{ERROR_VALUE}\0")),
        ),
        ProducerSpec::new(
            "cam-1",
            "rtsp://cam/x",
            CustomCommand::new("/bin/sh", [format!("--password={TEMPLATE_VALUE}{{oops}}")]),
        ),
    ];
    for spec in errors {
        seen.push(format!("{spec:?} {:?}", spec.command()));
        let err = sup.start(spec).await.unwrap_err();
        assert_eq!(err.kind(), kvs_frames::ErrorKind::InvalidConfig, "{err}");
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

    // Every password form on a command line: kvssink and rtspsrc properties …
    let gst = GstLaunchKvssink::new()
        .gst_launch("/bin/echo")
        .rtspsrc_property("user-id", "admin")
        .rtspsrc_property("user-pw", GST_USER_PW)
        .kvssink_property("secret-key", KVSSINK_SECRET_KEY);
    seen.push(format!("{gst:?}"));
    // … and custom arguments, the environment, the URL's password and query.
    let custom = CustomCommand::new(
        "/bin/sh",
        [
            "-c".to_owned(),
            PRINTER.to_owned(),
            "sh".to_owned(),
            format!("--password={ARG_EQ}"),
            "--token".to_owned(),
            ARG_SEPARATE.to_owned(),
            "--passwd".to_owned(),
            ARG_WITH_SPACE.to_owned(),
            format!("pw={ARG_PW}"),
            format!("secret={ARG_SECRET}"),
            format!("user-pw={ARG_USER_PW}"),
            "{url}".to_owned(),
        ],
    );
    seen.push(format!("{custom:?}"));
    let failing = |spec: ProducerSpec| {
        spec.start_secs(Duration::from_secs(5))
            .restart_policy(fast_policy().start_limit(Some(StartLimit {
                burst: 2,
                interval: Duration::from_secs(60),
            })))
    };
    let specs = [
        failing(ProducerSpec::new("cam-gst", "rtsp://127.0.0.1:8554/y", gst)),
        failing(
            ProducerSpec::new(
                "cam-custom",
                format!("rtsp://admin:{URL_PASSWORD}@127.0.0.1:8554/x?token={URL_TOKEN}"),
                custom,
            )
            .env("CAMERA_PASSWORD", ENV_PASSWORD)
            .env("AWS_SECRET_ACCESS_KEY", AWS_SECRET),
        ),
    ];
    for spec in specs {
        seen.push(format!("{spec:?} {:?}", spec.command()));
        let name = spec.stream_name().to_owned();
        let status = sup.start(spec).await.unwrap();
        seen.push(format!("{status:?}"));
        let fatal = sup
            .wait_for_state(&name, ProducerState::Fatal, Duration::from_secs(20))
            .await
            .unwrap();
        seen.push(format!("{fatal:?}"));
    }
    let custom = sup.status("cam-custom").unwrap();
    assert!(
        custom.command.contains("--password=<redacted>"),
        "{}",
        custom.command
    );
    assert!(
        custom.command.contains("--token <redacted>"),
        "{}",
        custom.command
    );
    assert!(
        custom.command.contains("--passwd <redacted> pw=<redacted>"),
        "{}",
        custom.command
    );
    assert!(
        custom
            .command
            .contains("rtsp://admin:***@127.0.0.1:8554/x?token=<redacted>"),
        "{}",
        custom.command
    );
    assert_eq!(
        custom.rtsp_url,
        "rtsp://admin:***@127.0.0.1:8554/x?token=<redacted>"
    );
    let gst = sup.status("cam-gst").unwrap();
    assert!(
        gst.command.contains("user-pw=<redacted>"),
        "{}",
        gst.command
    );
    assert!(
        gst.command.contains("secret-key=<redacted>"),
        "{}",
        gst.command
    );
    let printed: Vec<String> = sup
        .output("cam-custom")
        .unwrap()
        .into_iter()
        .map(|l| l.text)
        .collect();
    assert!(
        printed.iter().any(|l| l == "arg: <redacted>"),
        "{printed:?}"
    );
    assert!(
        printed.iter().any(|l| l == "CAMERA_PASSWORD=<redacted>"),
        "{printed:?}"
    );
    assert!(
        printed.iter().any(|l| l == "raw <redacted> and <redacted>"),
        "{printed:?}"
    );
    assert!(
        printed.iter().any(|l| l == "login password: <redacted> ok"),
        "{printed:?}"
    );

    for name in ["cam-1", "cam-gst", "cam-custom"] {
        seen.push(format!("{:?}", sup.status(name)));
        seen.push(format!("{:?}", sup.health(name)));
        seen.push(format!("{:?}", sup.output(name)));
    }
    seen.push(format!("{:?}", sup.list()));
    sup.stop("cam-1", StopMode::Graceful).await.unwrap();
    let report = sup.stop_all(StopMode::Graceful).await;
    seen.push(format!("{report:?} {:?}", report.error_messages()));
    while let Ok(ev) = events.try_recv() {
        seen.push(format!("{ev:?}"));
    }
    seen.push(format!("{sup:?} {:?}", sup.orphans()));
    let metrics = kvs_frames::metrics::encode_text(&registry).unwrap();
    assert!(
        metrics.contains("kvs_producer_state{stream=\"cam-custom\"} 5"),
        "{metrics}"
    );
    seen.push(metrics);

    let logs = String::from_utf8(logs.0.lock().unwrap().clone()).unwrap();
    // The logs did carry the URLs and command lines (redacted) and the producers' output.
    assert!(logs.contains("rtsp://admin:***@127.0.0.1:8554"), "{logs}");
    assert!(logs.contains("Streaming from rtsp source"), "{logs}");
    assert!(logs.contains("Terminating pipeline"), "{logs}");
    assert!(logs.contains("user-pw=<redacted>"), "{logs}");
    assert!(logs.contains("--token <redacted>"), "{logs}");
    assert!(logs.contains("CAMERA_PASSWORD=<redacted>"), "{logs}");
    let everything = format!("{logs}\n{}", seen.join("\n"));
    for (form, secret) in [
        ("the camera password", PASSWORD),
        ("the AWS secret", AWS_SECRET),
        ("rtspsrc user-pw", GST_USER_PW),
        ("kvssink secret-key", KVSSINK_SECRET_KEY),
        ("--password=", ARG_EQ),
        ("--token VALUE", ARG_SEPARATE),
        ("--passwd VALUE WITH SPACE", ARG_WITH_SPACE),
        ("pw=", ARG_PW),
        ("secret=", ARG_SECRET),
        ("user-pw= argument", ARG_USER_PW),
        ("environment", ENV_PASSWORD),
        ("URL password", URL_PASSWORD),
        ("URL token", URL_TOKEN),
        ("invalid property value", ERROR_VALUE),
        ("template error", TEMPLATE_VALUE),
        ("printed password: value", PRINTED),
    ] {
        assert!(
            !everything.contains(secret),
            "{form} leaked ({secret}):\n{}",
            everything
                .lines()
                .filter(|l| l.contains(secret))
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    // The part of a spaced value after its first word, too.
    assert!(!everything.contains("Spaced5"));
}
