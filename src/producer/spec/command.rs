//! The three kinds of [`ProducerCommand`] and their builders: [`KvsGstreamerSample`],
//! [`GstLaunchKvssink`] and [`CustomCommand`].

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::producer::secrets::{is_secret_name, redact, redact_args};

/// `kvs_gstreamer_sample <stream-name> <rtsp-url>` from the KVS C++ producer SDK.
///
/// The sample reads the AWS credentials (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`) and `AWS_DEFAULT_REGION` from its environment, which it inherits from the
/// supervisor (add or override variables with [`ProducerSpec::env`](super::ProducerSpec::env));
/// creates the stream when it is missing; loads its log configuration from
/// `../kvs_log_configuration` relative to its working directory and writes `./log/kvs.log`. It
/// exits 1 on setup failures and **0** after runtime RTSP errors, may hang when a camera goes
/// silent, and dies at once on SIGINT/SIGTERM (no signal handler): all of which the supervisor
/// handles.
#[derive(Clone, Debug, Default)]
pub struct KvsGstreamerSample {
    pub(super) binary: Option<PathBuf>,
    pub(super) working_dir: Option<PathBuf>,
    pub(super) aws_region: Option<String>,
    pub(super) readiness_line: Option<Option<String>>,
    pub(super) heartbeat_line: Option<Option<String>>,
}

impl KvsGstreamerSample {
    /// The sample with every default: binary from `$KVS_BINARY_PATH` or `PATH`, working
    /// directory the binary's directory.
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The binary. Default: `$KVS_BINARY_PATH` (the binary itself, or a directory holding
    /// `kvs_gstreamer_sample`), else `kvs_gstreamer_sample` looked up in `PATH`.
    #[must_use]
    pub fn binary(mut self, path: impl Into<PathBuf>) -> Self {
        self.binary = Some(path.into());
        self
    }

    /// The working directory, from which `../kvs_log_configuration` must resolve. Default: the
    /// binary's directory (in the SDK's layout the binary is in `build/` and the log
    /// configuration beside it, at the repository root).
    #[must_use]
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// Sets `AWS_DEFAULT_REGION` for the child. Default: inherited (the sample falls back to
    /// `us-west-2`).
    #[must_use]
    pub fn aws_region(mut self, region: impl Into<String>) -> Self {
        self.aws_region = Some(region.into());
        self
    }

    /// The line (substring) that marks the producer ready, or `None` to rely on
    /// [`ProducerSpec::start_secs`](super::ProducerSpec::start_secs) alone. Default:
    /// [`DEFAULT_KVS_SAMPLE_READINESS_LINE`](super::DEFAULT_KVS_SAMPLE_READINESS_LINE).
    #[must_use]
    pub fn readiness_line(mut self, line: Option<String>) -> Self {
        self.readiness_line = Some(line);
        self
    }

    /// The heartbeat line (substring) the stall watchdog waits for, or `None` to disable the
    /// watchdog. Default: [`DEFAULT_HEARTBEAT_LINE`](super::DEFAULT_HEARTBEAT_LINE), which the SDK
    /// prints at DEBUG level: the log configuration must let it through.
    #[must_use]
    pub fn heartbeat_line(mut self, line: Option<String>) -> Self {
        self.heartbeat_line = Some(line);
        self
    }
}

/// `gst-launch-1.0 -e rtspsrc location=… short-header=TRUE ! rtph264depay ! h264parse ! kvssink
/// stream-name=… aws-region=… storage-size=…` (H.264 cameras).
///
/// `-e` makes the first SIGINT send EOS, so kvssink flushes what it has buffered before it
/// exits (up to its `stop-stream-timeout`, 120 s by default): this is why the supervisor
/// stops with SIGINT and a long default
/// [`ProducerSpec::stop_timeout`](super::ProducerSpec::stop_timeout) (30 s). kvssink reads
/// the AWS credentials from the environment it inherits; it must be in `GST_PLUGIN_PATH`
/// (set it with [`ProducerSpec::env`](super::ProducerSpec::env)).
///
/// `Debug` shows the values of secret properties (`user-pw`, `secret-key`, …) as
/// `<redacted>`.
#[derive(Clone)]
pub struct GstLaunchKvssink {
    pub(super) gst_launch: PathBuf,
    pub(super) aws_region: Option<String>,
    pub(super) storage_size_mb: Option<u32>,
    pub(super) rtspsrc_properties: Vec<(String, String)>,
    pub(super) kvssink_properties: Vec<(String, String)>,
    pub(super) readiness_line: Option<String>,
    pub(super) heartbeat_line: Option<String>,
}

/// `name=value` pairs with secret values hidden, for `Debug`.
fn redacted_properties(props: &[(String, String)]) -> Vec<String> {
    props
        .iter()
        .map(|(name, value)| {
            if is_secret_name(name) {
                format!("{name}=<redacted>")
            } else {
                redact(&format!("{name}={value}")).into_owned()
            }
        })
        .collect()
}

impl fmt::Debug for GstLaunchKvssink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GstLaunchKvssink")
            .field("gst_launch", &self.gst_launch)
            .field("aws_region", &self.aws_region)
            .field("storage_size_mb", &self.storage_size_mb)
            .field(
                "rtspsrc_properties",
                &redacted_properties(&self.rtspsrc_properties),
            )
            .field(
                "kvssink_properties",
                &redacted_properties(&self.kvssink_properties),
            )
            .field("readiness_line", &self.readiness_line)
            .field("heartbeat_line", &self.heartbeat_line)
            .finish()
    }
}

impl Default for GstLaunchKvssink {
    fn default() -> Self {
        GstLaunchKvssink {
            gst_launch: PathBuf::from("gst-launch-1.0"),
            aws_region: None,
            storage_size_mb: None,
            rtspsrc_properties: Vec::new(),
            kvssink_properties: Vec::new(),
            readiness_line: None,
            heartbeat_line: None,
        }
    }
}

impl GstLaunchKvssink {
    /// The pipeline with every default (`gst-launch-1.0` from `PATH`).
    #[must_use]
    pub fn new() -> Self {
        Self::default()
    }

    /// The `gst-launch-1.0` binary. Default: looked up in `PATH`.
    #[must_use]
    pub fn gst_launch(mut self, path: impl Into<PathBuf>) -> Self {
        self.gst_launch = path.into();
        self
    }

    /// kvssink's `aws-region`. Default: not set (kvssink uses `AWS_DEFAULT_REGION`).
    #[must_use]
    pub fn aws_region(mut self, region: impl Into<String>) -> Self {
        self.aws_region = Some(region.into());
        self
    }

    /// kvssink's `storage-size` in MiB: the buffer that holds media not yet acknowledged.
    #[must_use]
    pub fn storage_size_mb(mut self, mb: u32) -> Self {
        self.storage_size_mb = Some(mb);
        self
    }

    /// Another `rtspsrc` property, for example `("protocols", "tcp")`, `("latency", "200")`, or
    /// `("user-id", "admin")` and `("user-pw", "…")` to keep the password out of the URL. The
    /// value of a secret property is redacted everywhere the supervisor reports the command,
    /// but it is on the command line all the same (see `docs/producer.md`, "What
    /// /proc/PID/cmdline shows").
    #[must_use]
    pub fn rtspsrc_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.rtspsrc_properties.push((name.into(), value.into()));
        self
    }

    /// Another kvssink property, for example `("retention-period", "24")`,
    /// `("fragment-duration", "2000")` or `("restart-on-error", "false")`. Never pass
    /// credentials here: the command line is visible to every local user.
    #[must_use]
    pub fn kvssink_property(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.kvssink_properties.push((name.into(), value.into()));
        self
    }

    /// The readiness line (substring). Default: `None` (ready after
    /// [`ProducerSpec::start_secs`](super::ProducerSpec::start_secs)).
    #[must_use]
    pub fn readiness_line(mut self, line: Option<String>) -> Self {
        self.readiness_line = line;
        self
    }

    /// The heartbeat line (substring) for the stall watchdog. Default: `None` (no watchdog): what
    /// kvssink prints per fragment depends on its log configuration, so set it once you know (for
    /// example [`DEFAULT_HEARTBEAT_LINE`](super::DEFAULT_HEARTBEAT_LINE) with DEBUG logging).
    #[must_use]
    pub fn heartbeat_line(mut self, line: Option<String>) -> Self {
        self.heartbeat_line = line;
        self
    }
}

/// Any program, with an argument template.
///
/// In each argument, `{stream}` becomes the stream name and `{url}` the RTSP URL; `{{` and
/// `}}` are literal braces; any other `{…}` is a configuration error (a typo such as
/// `{steam}` is caught at start).
///
/// Arguments that carry secrets (`--password=…`, `--token …`, `user-pw=…`) are redacted wherever
/// the supervisor reports the command, `Debug` included; they are on the command line all the same:
/// prefer passing secrets through [`ProducerSpec::env`](super::ProducerSpec::env).
#[derive(Clone)]
pub struct CustomCommand {
    pub(super) program: PathBuf,
    pub(super) args: Vec<String>,
    pub(super) working_dir: Option<PathBuf>,
    pub(super) readiness_line: Option<String>,
    pub(super) heartbeat_line: Option<String>,
}

impl fmt::Debug for CustomCommand {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CustomCommand")
            .field("program", &self.program)
            .field("args", &redact_args(&self.args))
            .field("working_dir", &self.working_dir)
            .field("readiness_line", &self.readiness_line)
            .field("heartbeat_line", &self.heartbeat_line)
            .finish()
    }
}

impl CustomCommand {
    /// `program` with the argument template `args`.
    #[must_use]
    pub fn new<I, S>(program: impl Into<PathBuf>, args: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        CustomCommand {
            program: program.into(),
            args: args.into_iter().map(Into::into).collect(),
            working_dir: None,
            readiness_line: None,
            heartbeat_line: None,
        }
    }

    /// The working directory. Default: the supervisor's.
    #[must_use]
    pub fn working_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.working_dir = Some(dir.into());
        self
    }

    /// The line (substring) that marks the producer ready. Default: `None` (ready after
    /// [`ProducerSpec::start_secs`](super::ProducerSpec::start_secs)).
    #[must_use]
    pub fn readiness_line(mut self, line: impl Into<String>) -> Self {
        self.readiness_line = Some(line.into());
        self
    }

    /// The heartbeat line (substring) for the stall watchdog. Default: `None` (no watchdog).
    #[must_use]
    pub fn heartbeat_line(mut self, line: impl Into<String>) -> Self {
        self.heartbeat_line = Some(line.into());
        self
    }
}

/// The process that feeds a stream.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub enum ProducerCommand {
    /// `kvs_gstreamer_sample <stream> <rtsp-url>`: the KVS C++ producer SDK's sample.
    KvsGstreamerSample(KvsGstreamerSample),
    /// `gst-launch-1.0 -e rtspsrc … ! kvssink …`: the SDK's GStreamer plugin.
    GstLaunchKvssink(GstLaunchKvssink),
    /// Any program and argument template.
    Custom(CustomCommand),
}

impl From<KvsGstreamerSample> for ProducerCommand {
    fn from(c: KvsGstreamerSample) -> Self {
        ProducerCommand::KvsGstreamerSample(c)
    }
}

impl From<GstLaunchKvssink> for ProducerCommand {
    fn from(c: GstLaunchKvssink) -> Self {
        ProducerCommand::GstLaunchKvssink(c)
    }
}

impl From<CustomCommand> for ProducerCommand {
    fn from(c: CustomCommand) -> Self {
        ProducerCommand::Custom(c)
    }
}

impl ProducerCommand {
    /// `"kvs_gstreamer_sample"`, `"gst_launch_kvssink"` or `"custom"`.
    #[must_use]
    pub fn kind(&self) -> &'static str {
        match self {
            ProducerCommand::KvsGstreamerSample(_) => "kvs_gstreamer_sample",
            ProducerCommand::GstLaunchKvssink(_) => "gst_launch_kvssink",
            ProducerCommand::Custom(_) => "custom",
        }
    }

    pub(super) fn default_stop_timeout(&self) -> Duration {
        match self {
            // No signal handler: SIGINT kills it at once.
            ProducerCommand::KvsGstreamerSample(_) => Duration::from_secs(5),
            // `-e`: SIGINT → EOS → kvssink flushes (up to its stop-stream-timeout).
            ProducerCommand::GstLaunchKvssink(_) => Duration::from_secs(30),
            ProducerCommand::Custom(_) => Duration::from_secs(10),
        }
    }

    pub(super) fn default_stall_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}
