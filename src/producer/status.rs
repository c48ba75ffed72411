//! What the supervisor reports: states, status snapshots, events, health and bulk results.

use std::fmt;
use std::time::{Duration, SystemTime};

use crate::error::Error;

/// The state of a producer, after supervisord's.
///
/// ```text
///            start                 readiness line or start_secs alive
///  Stopped ────────► Starting ───────────────────────────────► Running
///     ▲                 │ exits / cannot spawn                    │ exits, or no heartbeat
///     │ stop            ▼                                         ▼ for stall_timeout
///  Stopping ◄──── (any state) ── Backoff ◄────────────────────────┘
///                                   │ too many failed starts in the window
///                                   ▼
///                                 Fatal   (stays until start/restart)
///
///  Stopping / Running ── SIGKILL sent, process not gone within kill_timeout ──► Unkillable
///  (stays after a stop; after an unrequested end the supervisor moves on to Backoff)
/// ```
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ProducerState {
    /// Not running, by request (or never started).
    Stopped,
    /// The process runs but has neither printed its readiness line nor lived `start_secs`.
    Starting,
    /// Started; watched by the stall watchdog.
    Running,
    /// Ended without being asked to; waiting for the restart delay.
    Backoff,
    /// Being stopped: SIGINT sent, waiting up to `stop_timeout` before SIGKILL (then up to the
    /// kill timeout for the process to end).
    Stopping,
    /// Gave up after too many failed starts; the last error stays in the status.
    Fatal,
    /// The process did not end (or could not be reaped) within the kill timeout after
    /// SIGKILL: stuck in the kernel (D state) or held by a tracer. The supervisor stopped
    /// waiting for it (its pid is in [`ProducerStatus::unkillable_pids`] until it is reaped)
    /// and moved on: after a stop the producer stays here; after an unrequested end or a
    /// stall it is restarted as usual.
    Unkillable,
}

impl ProducerState {
    /// Every state, in gauge order.
    pub const ALL: [ProducerState; 7] = [
        ProducerState::Stopped,
        ProducerState::Starting,
        ProducerState::Running,
        ProducerState::Backoff,
        ProducerState::Stopping,
        ProducerState::Fatal,
        ProducerState::Unkillable,
    ];

    /// `"stopped"`, `"starting"`, `"running"`, `"backoff"`, `"stopping"`, `"fatal"` or
    /// `"unkillable"`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            ProducerState::Stopped => "stopped",
            ProducerState::Starting => "starting",
            ProducerState::Running => "running",
            ProducerState::Backoff => "backoff",
            ProducerState::Stopping => "stopping",
            ProducerState::Fatal => "fatal",
            ProducerState::Unkillable => "unkillable",
        }
    }

    /// The value of the `kvs_producer_state` gauge: 0 stopped, 1 starting, 2 running,
    /// 3 backoff, 4 stopping, 5 fatal, 6 unkillable.
    #[must_use]
    pub fn gauge_value(self) -> i64 {
        match self {
            ProducerState::Stopped => 0,
            ProducerState::Starting => 1,
            ProducerState::Running => 2,
            ProducerState::Backoff => 3,
            ProducerState::Stopping => 4,
            ProducerState::Fatal => 5,
            ProducerState::Unkillable => 6,
        }
    }

    /// Starting, Running, Backoff or Stopping: the supervisor is working on it.
    #[must_use]
    pub fn is_active(self) -> bool {
        !matches!(
            self,
            ProducerState::Stopped | ProducerState::Fatal | ProducerState::Unkillable
        )
    }
}

impl fmt::Display for ProducerState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a producer was restarted (the `reason` label of `kvs_producer_restarts_total`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[non_exhaustive]
pub enum RestartReason {
    /// The process exited with code 0 without being asked to (`kvs_gstreamer_sample` does
    /// after RTSP errors).
    ExitSuccess,
    /// The process exited with a non-zero code.
    ExitFailure,
    /// The process was killed by a signal nobody in the supervisor sent.
    Signal,
    /// The heartbeat line did not come for `stall_timeout`.
    Stall,
    /// The process could not be spawned.
    SpawnFailure,
    /// [`Supervisor::restart`](super::Supervisor::restart) was called.
    Manual,
}

impl RestartReason {
    /// Every reason (for pre-registering metric labels).
    pub const ALL: [RestartReason; 6] = [
        RestartReason::ExitSuccess,
        RestartReason::ExitFailure,
        RestartReason::Signal,
        RestartReason::Stall,
        RestartReason::SpawnFailure,
        RestartReason::Manual,
    ];

    /// The metric label: `exit_success`, `exit_failure`, `signal`, `stall`, `spawn_failure`,
    /// `manual`.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            RestartReason::ExitSuccess => "exit_success",
            RestartReason::ExitFailure => "exit_failure",
            RestartReason::Signal => "signal",
            RestartReason::Stall => "stall",
            RestartReason::SpawnFailure => "spawn_failure",
            RestartReason::Manual => "manual",
        }
    }
}

impl fmt::Display for RestartReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitKind {
    /// Exited with this code.
    Code(i32),
    /// Killed by this signal number (2 SIGINT, 9 SIGKILL, …).
    Signal(i32),
    /// Unknown: an adopted process (not the supervisor's child) whose status cannot be read.
    Unknown,
}

impl fmt::Display for ExitKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ExitKind::Code(c) => write!(f, "exited with code {c}"),
            ExitKind::Signal(s) => write!(f, "killed by signal {s} ({})", signal_name(*s)),
            ExitKind::Unknown => f.write_str("ended (exit status unknown)"),
        }
    }
}

pub(crate) fn signal_name(signal: i32) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGPIPE => "SIGPIPE",
        libc::SIGTERM => "SIGTERM",
        libc::SIGBUS => "SIGBUS",
        libc::SIGFPE => "SIGFPE",
        libc::SIGILL => "SIGILL",
        _ => "other",
    }
}

/// The end of the latest process of a producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct LastExit {
    /// Code or signal.
    pub kind: ExitKind,
    /// When the supervisor saw it end.
    pub at: SystemTime,
    /// Whether the supervisor asked it to end (stop, restart, stall).
    pub requested: bool,
    /// The pid it had.
    pub pid: u32,
}

/// A snapshot of one producer. Secrets are redacted: the URL shows `rtsp://user:***@host…`.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProducerStatus {
    /// The stream name (the producer's name).
    pub stream_name: String,
    /// `"kvs_gstreamer_sample"`, `"gst_launch_kvssink"` or `"custom"`.
    pub kind: &'static str,
    /// The camera URL, redacted.
    pub rtsp_url: String,
    /// The command line, redacted.
    pub command: String,
    /// The state.
    pub state: ProducerState,
    /// Since when.
    pub state_since: SystemTime,
    /// Why it entered this state (redacted).
    pub state_reason: String,
    /// The pid (and process group) of the current process.
    pub pid: Option<u32>,
    /// Whether the current process was adopted from an earlier supervisor (no output, no
    /// heartbeat, exit status unknown).
    pub adopted: bool,
    /// When the current process started.
    pub started_at: Option<SystemTime>,
    /// How long the current process has run.
    pub uptime: Option<Duration>,
    /// Restarts since the producer was added (all reasons, manual ones included).
    pub restarts: u64,
    /// Restarts by reason, only reasons that occurred.
    pub restarts_by_reason: Vec<(RestartReason, u64)>,
    /// Consecutive restarts since the last stable run (drives the delay).
    pub consecutive_restarts: u32,
    /// Failed starts in the current start-limit window.
    pub failed_starts: usize,
    /// During Backoff: the time left before the next start.
    pub next_start_in: Option<Duration>,
    /// How the previous process ended.
    pub last_exit: Option<LastExit>,
    /// The latest error: an error line of the output, or the supervisor's reason (redacted).
    pub last_error: Option<String>,
    /// When the heartbeat line was last seen (current process).
    pub last_heartbeat: Option<SystemTime>,
    /// CPU used by the process group, in percent of one core, over the last sampling interval.
    pub cpu_percent: Option<f64>,
    /// Resident memory of the process group, in bytes.
    pub rss_bytes: Option<u64>,
    /// Problems found when the command was prepared (for example no log configuration).
    pub warnings: Vec<String>,
    /// Processes of this producer that got SIGKILL but did not end, or could not be reaped,
    /// within the kill timeout ([`ProducerState::Unkillable`]); each leaves the list once it
    /// is reaped.
    pub unkillable_pids: Vec<u32>,
}

/// A state change of one producer.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProducerEvent {
    /// The producer.
    pub stream_name: String,
    /// When.
    pub at: SystemTime,
    /// The previous state.
    pub from: ProducerState,
    /// The new state.
    pub to: ProducerState,
    /// Why, in words (redacted).
    pub reason: String,
    /// The restart reason, when the change is part of a restart.
    pub restart_reason: Option<RestartReason>,
    /// The pid concerned, if any.
    pub pid: Option<u32>,
}

/// What [`Supervisor::health`](super::Supervisor::health) found.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct ProducerHealth {
    /// The producer.
    pub stream_name: String,
    /// Running, with a recent heartbeat (or no heartbeat configured), and no issue.
    pub healthy: bool,
    /// The state.
    pub state: ProducerState,
    /// What is wrong, most important first.
    pub issues: Vec<String>,
    /// What to try.
    pub recommendations: Vec<String>,
}

/// How to stop a producer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum StopMode {
    /// SIGINT to the process group, then SIGKILL after the producer's `stop_timeout`. Lets
    /// `gst-launch-1.0 -e` send EOS so kvssink uploads what it buffered.
    #[default]
    Graceful,
    /// SIGKILL to the process group at once (buffered media is lost). A force stop also
    /// escalates a graceful stop in progress.
    Force,
}

/// One line of a producer's output.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OutputLine {
    /// When it was read.
    pub at: SystemTime,
    /// From stderr (else stdout).
    pub stderr: bool,
    /// The pid that printed it.
    pub pid: u32,
    /// The text, redacted, without the newline; lines longer than 4 KiB are cut.
    pub text: String,
}

/// One failed item of a bulk operation.
#[derive(Clone, Debug)]
#[non_exhaustive]
pub struct BulkFailure {
    /// The producer.
    pub stream_name: String,
    /// What went wrong.
    pub error: Error,
}

/// The per-item result of [`Supervisor::start_all`](super::Supervisor::start_all) and
/// [`Supervisor::stop_all`](super::Supervisor::stop_all).
#[derive(Clone, Debug, Default)]
#[non_exhaustive]
pub struct BulkReport {
    /// The producers for which the operation succeeded.
    pub succeeded: Vec<String>,
    /// The others, with their error.
    pub failed: Vec<BulkFailure>,
}

impl BulkReport {
    /// No item failed.
    #[must_use]
    pub fn is_success(&self) -> bool {
        self.failed.is_empty()
    }

    /// `"{stream}: {error}"` for each failure.
    #[must_use]
    pub fn error_messages(&self) -> Vec<String> {
        self.failed
            .iter()
            .map(|f| format!("{}: {}", f.stream_name, f.error))
            .collect()
    }
}
