//! What to run for one camera: [`ProducerSpec`] and the three kinds of [`ProducerCommand`].
//!
//! * [`rtsp_url`]: the camera URL ([`RtspUrl`]), redacted wherever it is shown.
//! * [`command`]: the three kinds of command and their builders.
//! * [`render`]: validating a spec and building its command line ([`Rendered`]).
//! * [`validate`]: checks of programs, directories and properties used while rendering.

use std::fmt;
use std::time::Duration;

use crate::error::Result;

use super::restart::RestartPolicy;

mod command;
mod render;
mod rtsp_url;
mod validate;

pub use command::{CustomCommand, GstLaunchKvssink, KvsGstreamerSample, ProducerCommand};
pub(crate) use render::Rendered;
pub use rtsp_url::RtspUrl;

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
}

#[cfg(test)]
mod tests;
