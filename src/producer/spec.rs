//! What to run for one camera: [`ProducerSpec`] and the three kinds of [`ProducerCommand`].

use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};

use super::naming::validate_stream_name;
use super::restart::RestartPolicy;
use super::secrets::{self, Secrets, is_secret_name, redact, redact_args};

/// The longest [`ProducerSpec::start_secs`] and [`ProducerSpec::stop_timeout`]: 1 hour.
pub const MAX_START_STOP: Duration = Duration::from_secs(3600);

/// The longest [`ProducerSpec::stall_timeout`] and restart period
/// ([`RestartPolicy`](super::RestartPolicy) delays, `stable_after`, start-limit interval): 24 hours.
pub const MAX_PERIOD: Duration = Duration::from_secs(24 * 3600);

/// The environment variable that names the `kvs_gstreamer_sample` binary (a file) or the
/// directory that holds it, used when [`KvsGstreamerSample::binary`] is not set.
pub const KVS_BINARY_PATH_ENV: &str = "KVS_BINARY_PATH";

/// The heartbeat line of the KVS producer SDK: printed for about every fragment KVS
/// acknowledges (`Reporting fragment ack received. Ack timecode <n>`).
pub const DEFAULT_HEARTBEAT_LINE: &str = "Reporting fragment ack received";

/// The line `kvs_gstreamer_sample` prints once the RTSP source is linked into its pipeline.
pub const DEFAULT_KVS_SAMPLE_READINESS_LINE: &str = "Pad link successful";

/// Lines that count as error lines by default (ASCII case-insensitive substrings): the last one
/// is shown as the producer's last error.
pub const DEFAULT_ERROR_PATTERNS: &[&str] = &["error", "fail", "terminating", "could not"];

/// An RTSP URL, which usually carries the camera's password.
///
/// `Display` and `Debug` show it redacted (`rtsp://admin:***@10.0.0.5/live`); only
/// [`expose`](RtspUrl::expose) gives the original, to build the producer's command line.
#[derive(Clone, PartialEq, Eq)]
pub struct RtspUrl(String);

impl RtspUrl {
    /// Wraps `url` (validated when the producer starts).
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        RtspUrl(url.into())
    }

    /// The URL with its password, for the child's command line. Never log it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***` and secret query parameters
    /// (`password=`, `token=`, …) by `<redacted>`; a string that is not a URL with a host
    /// (where the redaction rules cannot locate a password) is hidden entirely.
    #[must_use]
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {
                self.secrets().redact(&self.0).into_owned()
            }
            _ => "<not a URL: hidden>".to_owned(),
        }
    }

    /// The password of the URL (as written and percent-decoded) and its secret query values.
    fn secret_values(&self) -> Vec<String> {
        let Ok(u) = url::Url::parse(&self.0) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(pw) = u.password() {
            out.push(pw.to_owned());
            if let Ok(decoded) = percent_decode(pw) {
                out.push(decoded);
            }
        }
        for (k, v) in u.query_pairs() {
            if is_secret_name(&k) {
                out.push(v.into_owned());
            }
        }
        out
    }

    fn secrets(&self) -> Secrets {
        Secrets::new(self.secret_values())
    }

    /// Checks that the URL parses and, when `rtsp_only`, that its scheme is `rtsp`, `rtsps`,
    /// `rtspt` or `rtspu`. The error shows the URL redacted, or not at all when it does not
    /// parse (a malformed URL may hide its password from the redaction rules).
    pub(crate) fn validate(&self, rtsp_only: bool) -> Result<()> {
        let parsed = url::Url::parse(&self.0).map_err(|e| {
            Error::invalid_config("rtsp_url", self.redacted(), &format!("not a URL: {e}"))
        })?;
        // Without an authority (`admin:pw@cam/x` parses with scheme `admin`), the redaction
        // rules cannot find the password: hide the value.
        let has_host = parsed.host_str().is_some_and(|h| !h.is_empty());
        let shown = self.redacted();
        if !has_host {
            return Err(Error::invalid_config(
                "rtsp_url",
                shown,
                "the URL has no host (expected rtsp://[user:password@]host[:port]/path)",
            ));
        }
        if rtsp_only && !matches!(parsed.scheme(), "rtsp" | "rtsps" | "rtspt" | "rtspu") {
            return Err(Error::invalid_config(
                "rtsp_url",
                shown,
                "the scheme must be rtsp, rtsps, rtspt or rtspu",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for RtspUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RtspUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RtspUrl({:?})", self.redacted())
    }
}

/// `kvs_gstreamer_sample <stream-name> <rtsp-url>` from the KVS C++ producer SDK.
///
/// The sample reads the AWS credentials (`AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`,
/// `AWS_SESSION_TOKEN`) and `AWS_DEFAULT_REGION` from its environment, which it inherits from
/// the supervisor (add or override variables with [`ProducerSpec::env`]); creates the stream
/// when it is missing; loads its log configuration from `../kvs_log_configuration` relative to
/// its working directory and writes `./log/kvs.log`. It exits 1 on setup failures and **0**
/// after runtime RTSP errors, may hang when a camera goes silent, and dies at once on
/// SIGINT/SIGTERM (no signal handler): all of which the supervisor handles.
#[derive(Clone, Debug, Default)]
pub struct KvsGstreamerSample {
    binary: Option<PathBuf>,
    working_dir: Option<PathBuf>,
    aws_region: Option<String>,
    readiness_line: Option<Option<String>>,
    heartbeat_line: Option<Option<String>>,
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
    /// [`ProducerSpec::start_secs`] alone. Default: [`DEFAULT_KVS_SAMPLE_READINESS_LINE`].
    #[must_use]
    pub fn readiness_line(mut self, line: Option<String>) -> Self {
        self.readiness_line = Some(line);
        self
    }

    /// The heartbeat line (substring) the stall watchdog waits for, or `None` to disable the
    /// watchdog. Default: [`DEFAULT_HEARTBEAT_LINE`], which the SDK prints at DEBUG level:
    /// the log configuration must let it through.
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
/// stops with SIGINT and a long default [`ProducerSpec::stop_timeout`] (30 s). kvssink reads
/// the AWS credentials from the environment it inherits; it must be in `GST_PLUGIN_PATH`
/// (set it with [`ProducerSpec::env`]).
///
/// `Debug` shows the values of secret properties (`user-pw`, `secret-key`, …) as
/// `<redacted>`.
#[derive(Clone)]
pub struct GstLaunchKvssink {
    gst_launch: PathBuf,
    aws_region: Option<String>,
    storage_size_mb: Option<u32>,
    rtspsrc_properties: Vec<(String, String)>,
    kvssink_properties: Vec<(String, String)>,
    readiness_line: Option<String>,
    heartbeat_line: Option<String>,
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
    /// [`ProducerSpec::start_secs`]).
    #[must_use]
    pub fn readiness_line(mut self, line: Option<String>) -> Self {
        self.readiness_line = line;
        self
    }

    /// The heartbeat line (substring) for the stall watchdog. Default: `None` (no watchdog):
    /// what kvssink prints per fragment depends on its log configuration, so set it once you
    /// know (for example [`DEFAULT_HEARTBEAT_LINE`] with DEBUG logging).
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
/// Arguments that carry secrets (`--password=…`, `--token …`, `user-pw=…`) are redacted
/// wherever the supervisor reports the command, `Debug` included; they are on the command
/// line all the same: prefer passing secrets through [`ProducerSpec::env`].
#[derive(Clone)]
pub struct CustomCommand {
    program: PathBuf,
    args: Vec<String>,
    working_dir: Option<PathBuf>,
    readiness_line: Option<String>,
    heartbeat_line: Option<String>,
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
    /// [`ProducerSpec::start_secs`]).
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

    fn default_stop_timeout(&self) -> Duration {
        match self {
            // No signal handler: SIGINT kills it at once.
            ProducerCommand::KvsGstreamerSample(_) => Duration::from_secs(5),
            // `-e`: SIGINT → EOS → kvssink flushes (up to its stop-stream-timeout).
            ProducerCommand::GstLaunchKvssink(_) => Duration::from_secs(30),
            ProducerCommand::Custom(_) => Duration::from_secs(10),
        }
    }

    fn default_stall_timeout(&self) -> Duration {
        Duration::from_secs(30)
    }
}

/// A fully resolved command line, ready to spawn.
#[derive(Clone)]
pub(crate) struct Rendered {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub working_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub readiness_line: Option<String>,
    pub heartbeat_line: Option<String>,
    /// Warnings worth a health issue (e.g. no log configuration for the sample).
    pub warnings: Vec<String>,
    /// The secret values of this producer (URL password, secret properties, arguments and
    /// environment values), redacted from everything reported about it.
    pub secrets: Secrets,
}

impl Rendered {
    /// The command line with secrets redacted, for logs and status.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for arg in redact_args(&self.args) {
            s.push(' ');
            s.push_str(&arg);
        }
        self.secrets.redact(&s).into_owned()
    }

    /// Gathers the secrets of the rendered command, its environment and the supervisor's
    /// own environment (inherited by the child).
    fn with_secrets(mut self, url: &RtspUrl) -> Self {
        let mut values = url.secret_values();
        values.extend(secrets::secret_arg_values(&self.args));
        values.extend(
            self.env
                .iter()
                .filter(|(k, _)| is_secret_name(k))
                .map(|(_, v)| v.clone()),
        );
        values.extend(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| is_secret_name(k))
                .map(|(_, v)| v),
        );
        self.secrets = Secrets::new(values);
        self
    }
}

/// One producer: the stream it feeds, the camera it reads and how to supervise it.
///
/// The stream name identifies the producer in the [`Supervisor`](super::Supervisor): it must be
/// a valid KVS stream name (`[a-zA-Z0-9_.-]{1,256}`) and unique among the supervisor's
/// producers. Everything is validated when the producer starts.
///
/// ```
/// use std::time::Duration;
/// use kvs_frames::producer::{KvsGstreamerSample, ProducerSpec, RestartPolicy};
///
/// let spec = ProducerSpec::new(
///     "front-door",
///     "rtsp://admin:hunter2@10.0.0.5:554/Streaming/Channels/101",
///     KvsGstreamerSample::new().aws_region("eu-west-1"),
/// )
/// .stall_timeout(Some(Duration::from_secs(45)))
/// .restart_policy(RestartPolicy::default().max_delay(Duration::from_secs(30)));
/// // The password never shows:
/// assert!(format!("{spec:?}").contains("rtsp://admin:***@10.0.0.5"));
/// assert!(!format!("{spec:?}").contains("hunter2"));
/// ```
#[derive(Clone)]
pub struct ProducerSpec {
    pub(crate) stream_name: String,
    pub(crate) rtsp_url: RtspUrl,
    pub(crate) command: ProducerCommand,
    pub(crate) env: Vec<(String, String)>,
    pub(crate) start_secs: Duration,
    pub(crate) stall_timeout: Option<Duration>,
    pub(crate) stop_timeout: Duration,
    pub(crate) restart: RestartPolicy,
    pub(crate) output_lines: usize,
    pub(crate) error_patterns: Vec<String>,
}

impl fmt::Debug for ProducerSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ProducerSpec")
            .field("stream_name", &self.stream_name)
            .field("rtsp_url", &self.rtsp_url)
            .field("command", &self.command)
            // Values may be credentials: names only.
            .field(
                "env",
                &self.env.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            )
            .field("start_secs", &self.start_secs)
            .field("stall_timeout", &self.stall_timeout)
            .field("stop_timeout", &self.stop_timeout)
            .field("restart", &self.restart)
            .field("output_lines", &self.output_lines)
            .finish_non_exhaustive()
    }
}

impl ProducerSpec {
    /// A producer for `stream_name` reading `rtsp_url` with `command`, and the defaults:
    /// ready after 10 s alive (or the command's readiness line), stall timeout 30 s when the
    /// command has a heartbeat line, stop timeout per command kind (5 s for the sample, 30 s
    /// for kvssink, 10 s otherwise), [`RestartPolicy::default`], the last 200 output lines
    /// kept.
    #[must_use]
    pub fn new(
        stream_name: impl Into<String>,
        rtsp_url: impl Into<String>,
        command: impl Into<ProducerCommand>,
    ) -> Self {
        let command = command.into();
        ProducerSpec {
            stream_name: stream_name.into(),
            rtsp_url: RtspUrl::new(rtsp_url),
            stop_timeout: command.default_stop_timeout(),
            stall_timeout: Some(command.default_stall_timeout()),
            command,
            env: Vec::new(),
            start_secs: Duration::from_secs(10),
            restart: RestartPolicy::default(),
            output_lines: 200,
            error_patterns: DEFAULT_ERROR_PATTERNS
                .iter()
                .map(|s| (*s).to_owned())
                .collect(),
        }
    }

    /// The stream name (also the producer's name in the supervisor).
    #[must_use]
    pub fn stream_name(&self) -> &str {
        &self.stream_name
    }

    /// The camera URL (redacted when displayed).
    #[must_use]
    pub fn rtsp_url(&self) -> &RtspUrl {
        &self.rtsp_url
    }

    /// The command.
    #[must_use]
    pub fn command(&self) -> &ProducerCommand {
        &self.command
    }

    /// Sets an environment variable for the child (added to the inherited environment).
    /// Values are never logged or shown.
    #[must_use]
    pub fn env(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((name.into(), value.into()));
        self
    }

    /// How long the process must stay alive to count as started (Running) when it has not
    /// printed its readiness line. Default 10 s. Must be between 100 ms and
    /// [`MAX_START_STOP`] (1 h), else `start` fails with an error naming the value.
    #[must_use]
    pub fn start_secs(mut self, d: Duration) -> Self {
        self.start_secs = d;
        self
    }

    /// How long a Running producer may go without printing its heartbeat line before it is
    /// restarted; `None` disables the watchdog. Ignored when the command has no heartbeat
    /// line. Default 30 s. Must be between 100 ms and [`MAX_PERIOD`] (24 h).
    #[must_use]
    pub fn stall_timeout(mut self, d: Option<Duration>) -> Self {
        self.stall_timeout = d;
        self
    }

    /// How long a graceful stop waits after SIGINT before it sends SIGKILL. Default per command
    /// kind (see [`ProducerSpec::new`]). At most [`MAX_START_STOP`] (1 h).
    #[must_use]
    pub fn stop_timeout(mut self, d: Duration) -> Self {
        self.stop_timeout = d;
        self
    }

    /// Restart delays and the start-rate limit.
    #[must_use]
    pub fn restart_policy(mut self, policy: RestartPolicy) -> Self {
        self.restart = policy;
        self
    }

    /// How many of the latest output lines (stdout and stderr) are kept for diagnosis.
    /// Default 200. Must be 1–100000.
    #[must_use]
    pub fn output_lines(mut self, n: usize) -> Self {
        self.output_lines = n;
        self
    }

    /// The substrings (ASCII case-insensitive) that make an output line an error line; the
    /// latest error line is the status's `last_error`. Default [`DEFAULT_ERROR_PATTERNS`].
    #[must_use]
    pub fn error_patterns<I, S>(mut self, patterns: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.error_patterns = patterns.into_iter().map(Into::into).collect();
        self
    }

    /// Checks every option without starting anything: stream name, URL, durations, restart
    /// policy, and that the binary exists and is executable.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](crate::ErrorKind::InvalidConfig) naming the option and value.
    pub fn validate(&self) -> Result<()> {
        self.render_with(
            std::env::var_os(KVS_BINARY_PATH_ENV),
            std::env::var_os("PATH"),
        )
        .map(|_| ())
    }

    pub(crate) fn render(&self) -> Result<Rendered> {
        self.render_with(
            std::env::var_os(KVS_BINARY_PATH_ENV),
            std::env::var_os("PATH"),
        )
    }

    /// Validates and renders with the given `$KVS_BINARY_PATH` and `$PATH` (injected for
    /// tests).
    pub(crate) fn render_with(
        &self,
        kvs_binary_path: Option<OsString>,
        path_var: Option<OsString>,
    ) -> Result<Rendered> {
        validate_stream_name(&self.stream_name)?;
        let min = Duration::from_millis(100);
        if !(min..=MAX_START_STOP).contains(&self.start_secs) {
            return Err(Error::invalid_config(
                "start_secs",
                format!("{:?}", self.start_secs),
                "must be between 100 ms and 1 h",
            ));
        }
        if let Some(stall) = self.stall_timeout
            && !(min..=MAX_PERIOD).contains(&stall)
        {
            return Err(Error::invalid_config(
                "stall_timeout",
                format!("{stall:?}"),
                "must be between 100 ms and 24 h (or None to disable the watchdog)",
            ));
        }
        if self.stop_timeout > MAX_START_STOP {
            return Err(Error::invalid_config(
                "stop_timeout",
                format!("{:?}", self.stop_timeout),
                "must be at most 1 h",
            ));
        }
        if !(1..=100_000).contains(&self.output_lines) {
            return Err(Error::invalid_config(
                "output_lines",
                self.output_lines,
                "must be between 1 and 100000",
            ));
        }
        for (name, _) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Error::invalid_config(
                    "env",
                    format!("{name:?}"),
                    "a variable name must be non-empty without `=` or NUL",
                ));
            }
        }
        self.restart.validate()?;
        let stream = self.stream_name.as_str();
        let url = self.rtsp_url.expose();
        match &self.command {
            ProducerCommand::KvsGstreamerSample(c) => {
                self.rtsp_url.validate(true)?;
                let program = match &c.binary {
                    Some(path) => check_executable("binary", path, path_var.as_ref())?,
                    None => resolve_kvs_binary(kvs_binary_path, path_var.as_ref())?,
                };
                let working_dir = match &c.working_dir {
                    Some(dir) => dir.clone(),
                    None => program
                        .parent()
                        .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                };
                check_dir("working_dir", &working_dir)?;
                let mut warnings = Vec::new();
                if !working_dir.join("../kvs_log_configuration").is_file() {
                    warnings.push(format!(
                        "{} has no ../kvs_log_configuration: the sample logs with its defaults, \
                         and the heartbeat line may never appear",
                        working_dir.display()
                    ));
                }
                let mut env = Vec::new();
                if let Some(region) = &c.aws_region {
                    env.push(("AWS_DEFAULT_REGION".to_owned(), region.clone()));
                }
                env.extend(self.env.iter().cloned());
                Ok(Rendered {
                    program,
                    args: vec![stream.to_owned(), url.to_owned()],
                    working_dir: Some(working_dir),
                    env,
                    readiness_line: c
                        .readiness_line
                        .clone()
                        .unwrap_or_else(|| Some(DEFAULT_KVS_SAMPLE_READINESS_LINE.to_owned())),
                    heartbeat_line: c
                        .heartbeat_line
                        .clone()
                        .unwrap_or_else(|| Some(DEFAULT_HEARTBEAT_LINE.to_owned())),
                    warnings,
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
            ProducerCommand::GstLaunchKvssink(c) => {
                self.rtsp_url.validate(true)?;
                let program = check_executable("gst_launch", &c.gst_launch, path_var.as_ref())?;
                let mut args = vec![
                    "-e".to_owned(),
                    "rtspsrc".to_owned(),
                    format!("location={url}"),
                    "short-header=TRUE".to_owned(),
                ];
                for (name, value) in &c.rtspsrc_properties {
                    check_property("rtspsrc_property", name, value)?;
                    args.push(format!("{name}={value}"));
                }
                args.extend(
                    ["!", "rtph264depay", "!", "h264parse", "!", "kvssink"].map(str::to_owned),
                );
                args.push(format!("stream-name={stream}"));
                if let Some(region) = &c.aws_region {
                    check_property("aws_region", "aws-region", region)?;
                    args.push(format!("aws-region={region}"));
                }
                if let Some(mb) = c.storage_size_mb {
                    if mb == 0 {
                        return Err(Error::invalid_config(
                            "storage_size_mb",
                            mb,
                            "must be at least 1",
                        ));
                    }
                    args.push(format!("storage-size={mb}"));
                }
                for (name, value) in &c.kvssink_properties {
                    check_property("kvssink_property", name, value)?;
                    args.push(format!("{name}={value}"));
                }
                Ok(Rendered {
                    program,
                    args,
                    working_dir: None,
                    env: self.env.clone(),
                    readiness_line: c.readiness_line.clone(),
                    heartbeat_line: c.heartbeat_line.clone(),
                    warnings: Vec::new(),
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
            ProducerCommand::Custom(c) => {
                self.rtsp_url.validate(false)?;
                let program = check_executable("program", &c.program, path_var.as_ref())?;
                if let Some(dir) = &c.working_dir {
                    check_dir("working_dir", dir)?;
                }
                let args = c
                    .args
                    .iter()
                    .map(|a| render_template(a, stream, url))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Rendered {
                    program,
                    args,
                    working_dir: c.working_dir.clone(),
                    env: self.env.clone(),
                    readiness_line: c.readiness_line.clone(),
                    heartbeat_line: c.heartbeat_line.clone(),
                    warnings: Vec::new(),
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
        }
    }
}

/// `%XX` sequences decoded (for the URL password in its decoded form).
fn percent_decode(text: &str) -> std::result::Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}

/// Replaces `{stream}` and `{url}`; `{{`/`}}` are literal braces.
pub(crate) fn render_template(template: &str, stream: &str, url: &str) -> Result<String> {
    let mut out = String::with_capacity(template.len() + url.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{stream}") {
            out.push_str(stream);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{url}") {
            out.push_str(url);
            rest = after;
        } else {
            let shown: String = redact(tail).chars().take(20).collect();
            return Err(Error::invalid_config(
                "args",
                format!("{:?}", redact_args(&[template.to_owned()])[0]),
                &format!(
                    "unknown placeholder or lone brace at {shown:?}: use {{stream}}, {{url}}, {{{{ or }}}}"
                ),
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}

fn check_property(option: &str, name: &str, value: &str) -> Result<()> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(Error::invalid_config(
            option,
            format!("{name:?}"),
            "a property name is ASCII letters, digits, `-` and `_`",
        ));
    }
    if value.is_empty() || value.contains('\0') {
        let shown = if is_secret_name(name) {
            format!("{name}=<redacted>")
        } else {
            redact(&format!("{name}={value:?}")).into_owned()
        };
        return Err(Error::invalid_config(
            option,
            shown,
            "a property value must be non-empty without NUL",
        ));
    }
    Ok(())
}

fn check_dir(option: &str, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::invalid_config(
            option,
            dir.display(),
            "not an existing directory",
        ))
    }
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A program path: checked as is when it contains a `/`, else looked up in `path_var`.
fn check_executable(option: &str, program: &Path, path_var: Option<&OsString>) -> Result<PathBuf> {
    if program.as_os_str().is_empty() {
        return Err(Error::invalid_config(option, "\"\"", "empty program path"));
    }
    if program.components().count() > 1 || program.is_absolute() {
        if !program.exists() {
            return Err(Error::invalid_config(
                option,
                program.display(),
                "no such file",
            ));
        }
        if !is_executable_file(program) {
            return Err(Error::invalid_config(
                option,
                program.display(),
                "not an executable file",
            ));
        }
        return Ok(program.to_path_buf());
    }
    let found = path_var.and_then(|paths| {
        std::env::split_paths(paths)
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable_file(candidate))
    });
    found.ok_or_else(|| {
        Error::invalid_config(
            option,
            program.display(),
            "not found as an executable in PATH",
        )
    })
}

/// `$KVS_BINARY_PATH` (a file, or a directory holding `kvs_gstreamer_sample`), else
/// `kvs_gstreamer_sample` in `PATH`.
pub(crate) fn resolve_kvs_binary(
    kvs_binary_path: Option<OsString>,
    path_var: Option<&OsString>,
) -> Result<PathBuf> {
    const NAME: &str = "kvs_gstreamer_sample";
    match kvs_binary_path.filter(|v| !v.is_empty()) {
        Some(value) => {
            let path = PathBuf::from(value);
            let candidate = if path.is_dir() { path.join(NAME) } else { path };
            if !candidate.exists() {
                return Err(Error::invalid_config(
                    KVS_BINARY_PATH_ENV,
                    candidate.display(),
                    "no such file",
                ));
            }
            if !is_executable_file(&candidate) {
                return Err(Error::invalid_config(
                    KVS_BINARY_PATH_ENV,
                    candidate.display(),
                    "not an executable file",
                ));
            }
            Ok(candidate)
        }
        None => check_executable("binary", Path::new(NAME), path_var).map_err(|_| {
            Error::invalid_config(
                "binary",
                NAME,
                "not found in PATH; set the binary or $KVS_BINARY_PATH",
            )
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;
    use std::os::unix::fs::PermissionsExt;

    fn temp_dir(name: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kvs-frames-spec-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn write_exec(path: &Path, mode: u32) {
        std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn template_placeholders() {
        assert_eq!(
            render_template("--name={stream} {url} {{x}}", "cam-1", "rtsp://h/x").unwrap(),
            "--name=cam-1 rtsp://h/x {x}"
        );
        let err = render_template("{steam}", "cam-1", "rtsp://a:pw@h/").unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.invalid_option(), Some("args"));
        assert!(err.to_string().contains("{steam}"), "{err}");
        assert!(render_template("a } b", "s", "u").is_err());
    }

    #[test]
    fn kvs_binary_path_file_dir_and_path_lookup() {
        let dir = temp_dir("binpath");
        let bin = dir.join("kvs_gstreamer_sample");
        write_exec(&bin, 0o755);
        assert_eq!(
            resolve_kvs_binary(Some(bin.clone().into_os_string()), None).unwrap(),
            bin
        );
        assert_eq!(
            resolve_kvs_binary(Some(dir.clone().into_os_string()), None).unwrap(),
            bin
        );
        let path_var = std::env::join_paths(["/nonexistent", dir.to_str().unwrap()]).unwrap();
        assert_eq!(resolve_kvs_binary(None, Some(&path_var)).unwrap(), bin);

        let err = resolve_kvs_binary(None, Some(&OsString::from("/nonexistent"))).unwrap_err();
        assert_eq!(err.invalid_option(), Some("binary"));
        let err = resolve_kvs_binary(Some(dir.join("missing").into_os_string()), None).unwrap_err();
        assert_eq!(err.invalid_option(), Some(KVS_BINARY_PATH_ENV));
        assert!(err.to_string().contains("no such file"), "{err}");

        let not_exec = dir.join("not-exec");
        write_exec(&not_exec, 0o644);
        let err = resolve_kvs_binary(Some(not_exec.into_os_string()), None).unwrap_err();
        assert!(err.to_string().contains("not an executable"), "{err}");
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn sample_command_line_and_working_dir() {
        let dir = temp_dir("sample");
        let build = dir.join("build");
        std::fs::create_dir_all(&build).unwrap();
        std::fs::write(dir.join("kvs_log_configuration"), "").unwrap();
        let bin = build.join("kvs_gstreamer_sample");
        write_exec(&bin, 0o755);
        let spec = ProducerSpec::new(
            "cam-1",
            "rtsp://admin:hunter2@10.0.0.5/live",
            KvsGstreamerSample::new()
                .binary(&bin)
                .aws_region("eu-west-1"),
        );
        let r = spec.render_with(None, None).unwrap();
        assert_eq!(r.program, bin);
        assert_eq!(r.args, ["cam-1", "rtsp://admin:hunter2@10.0.0.5/live"]);
        assert_eq!(r.working_dir.as_deref(), Some(build.as_path()));
        assert!(r.warnings.is_empty(), "{:?}", r.warnings);
        assert!(
            r.env
                .contains(&("AWS_DEFAULT_REGION".into(), "eu-west-1".into()))
        );
        assert_eq!(r.heartbeat_line.as_deref(), Some(DEFAULT_HEARTBEAT_LINE));
        assert!(!r.display().contains("hunter2"));
        assert!(r.display().contains("rtsp://admin:***@10.0.0.5/live"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn kvssink_command_line() {
        let spec = ProducerSpec::new(
            "cam-1",
            "rtsp://u:p@cam/x",
            GstLaunchKvssink::new()
                .gst_launch("/bin/sh")
                .aws_region("us-east-1")
                .storage_size_mb(256)
                .rtspsrc_property("protocols", "tcp")
                .kvssink_property("retention-period", "24"),
        );
        let r = spec.render_with(None, None).unwrap();
        assert_eq!(
            r.args.join(" "),
            "-e rtspsrc location=rtsp://u:p@cam/x short-header=TRUE protocols=tcp ! rtph264depay \
             ! h264parse ! kvssink stream-name=cam-1 aws-region=us-east-1 storage-size=256 \
             retention-period=24"
        );
        let bad = ProducerSpec::new(
            "cam-1",
            "rtsp://cam/x",
            GstLaunchKvssink::new()
                .gst_launch("/bin/sh")
                .kvssink_property("x ! fakesink", "1"),
        );
        assert_eq!(
            bad.validate().unwrap_err().invalid_option(),
            Some("kvssink_property")
        );
    }

    #[test]
    fn invalid_options_are_named() {
        let ok = || {
            ProducerSpec::new(
                "cam-1",
                "rtsp://cam/x",
                CustomCommand::new("/bin/sh", ["-c", "true"]),
            )
        };
        assert!(ok().validate().is_ok());
        let cases: Vec<(ProducerSpec, &str)> = vec![
            (
                ProducerSpec::new(
                    "bad name",
                    "rtsp://cam/x",
                    CustomCommand::new("/bin/sh", ["x"]),
                ),
                "stream_name",
            ),
            (ok().start_secs(Duration::ZERO), "start_secs"),
            (
                ok().stall_timeout(Some(Duration::from_millis(1))),
                "stall_timeout",
            ),
            (ok().output_lines(0), "output_lines"),
            (ok().env("A=B", "x"), "env"),
            (
                ProducerSpec::new("cam-1", "not a url", CustomCommand::new("/bin/sh", ["x"])),
                "rtsp_url",
            ),
            (
                ProducerSpec::new(
                    "cam-1",
                    "rtsp://cam/x",
                    CustomCommand::new("/nonexistent/prog", ["x"]),
                ),
                "program",
            ),
            (
                ProducerSpec::new(
                    "cam-1",
                    "http://u:pw@cam/x",
                    KvsGstreamerSample::new().binary("/bin/sh"),
                ),
                "rtsp_url",
            ),
            (
                ProducerSpec::new(
                    "cam-1",
                    "rtsp://cam/x",
                    KvsGstreamerSample::new()
                        .binary("/bin/sh")
                        .working_dir("/nonexistent"),
                ),
                "working_dir",
            ),
        ];
        for (spec, option) in cases {
            let err = spec.validate().unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
            assert_eq!(err.invalid_option(), Some(option), "{err}");
            assert!(!err.to_string().contains("pw@"), "{err}");
        }
    }

    #[test]
    fn url_errors_never_show_the_password() {
        for url in [
            "admin:pw@cam/x",
            "rtsp//admin:pw@cam",
            "ftp://admin:pw@cam/x",
        ] {
            let spec = ProducerSpec::new("c", url, KvsGstreamerSample::new().binary("/bin/sh"));
            let err = spec.validate().unwrap_err();
            assert!(!format!("{err} {err:?}").contains("pw"), "{err:?}");
        }
    }
}
