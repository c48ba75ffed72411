//! Child processes: spawning in a new process group with the supervisor's marker, signals to
//! the group, and draining stdout/stderr line by line without ever blocking the child.

use std::collections::VecDeque;
use std::io;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::redact::redact_text;

use super::procfs;
use super::spec::Rendered;
use super::status::{ExitKind, OutputLine};

/// The supervisor id (the namespace of orphan detection).
pub(crate) const ENV_SUPERVISOR_ID: &str = "KVS_FRAMES_SUPERVISOR_ID";
/// `{pid}.{start_ticks}.{nonce}` of the supervisor instance that spawned the process.
pub(crate) const ENV_INSTANCE: &str = "KVS_FRAMES_SUPERVISOR_INSTANCE";
/// The producer (stream) name.
pub(crate) const ENV_PRODUCER: &str = "KVS_FRAMES_PRODUCER";

/// Output lines longer than this are cut.
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// Sends `signal` to process group `pgid`. Never signals group 0 or 1 (our own group, init) nor
/// our own group. Returns whether the group existed.
pub(crate) fn signal_group(pgid: i32, signal: i32) -> bool {
    // SAFETY: getpgrp has no preconditions.
    let own = unsafe { libc::getpgrp() };
    if pgid <= 1 || pgid == own {
        return false;
    }
    // SAFETY: kill with a negative pid signals the group; no memory is involved.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// Sends `signal` to one process. Never to pid 0, 1 or ourselves.
pub(crate) fn signal_pid(pid: i32, signal: i32) -> bool {
    if pid <= 1 || u32::try_from(pid).ok() == Some(std::process::id()) {
        return false;
    }
    // SAFETY: as above.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// What marks a child as ours in its environment.
#[derive(Clone, Debug)]
pub(crate) struct Marker {
    pub id: String,
    pub instance: String,
}

/// Spawns the rendered command in a new process group, stdin closed, stdout/stderr piped,
/// with the marker variables, and with SIGINT/SIGTERM/SIGQUIT/SIGHUP restored to their
/// defaults (a supervisor started in the background may ignore SIGINT, and children inherit
/// ignored signals).
pub(crate) fn spawn(
    rendered: &Rendered,
    marker: &Marker,
    name: &str,
) -> io::Result<tokio::process::Child> {
    let mut cmd = tokio::process::Command::new(&rendered.program);
    cmd.args(&rendered.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .envs(rendered.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(ENV_SUPERVISOR_ID, &marker.id)
        .env(ENV_INSTANCE, &marker.instance)
        .env(ENV_PRODUCER, name)
        .process_group(0)
        // Only matters when the runtime drops a runner that had no chance to reap its child.
        .kill_on_drop(true);
    if let Some(dir) = &rendered.working_dir {
        cmd.current_dir(dir);
    }
    // SAFETY: the closure only calls `signal`, which is async-signal-safe, and allocates
    // nothing.
    unsafe {
        cmd.pre_exec(|| {
            for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGQUIT, libc::SIGHUP] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    cmd.spawn()
}

/// Signals of one process (one launch), written by its output readers.
pub(crate) struct LaunchSignals {
    pub ready: Notify,
    pub ready_seen: AtomicBool,
    pub last_heartbeat: Mutex<Option<Instant>>,
}

impl LaunchSignals {
    pub fn new() -> Arc<Self> {
        Arc::new(LaunchSignals {
            ready: Notify::new(),
            ready_seen: AtomicBool::new(false),
            last_heartbeat: Mutex::new(None),
        })
    }
}

/// The last N lines of a producer, kept across its restarts.
pub(crate) struct OutputBuffer {
    pub lines: VecDeque<OutputLine>,
    pub capacity: usize,
    pub last_error: Option<String>,
    pub last_heartbeat: Option<SystemTime>,
    pub heartbeats_seen: u64,
}

impl OutputBuffer {
    pub fn new(capacity: usize) -> Self {
        OutputBuffer {
            lines: VecDeque::new(),
            capacity,
            last_error: None,
            last_heartbeat: None,
            heartbeats_seen: 0,
        }
    }
}

/// What a reader needs to classify lines.
pub(crate) struct LineRules {
    pub name: String,
    pub pid: u32,
    pub readiness: Option<String>,
    pub heartbeat: Option<String>,
    /// Lower case.
    pub error_patterns: Vec<String>,
}

fn handle_line(
    raw: &[u8],
    stderr: bool,
    rules: &LineRules,
    launch: &LaunchSignals,
    output: &Mutex<OutputBuffer>,
) {
    let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
    let text = String::from_utf8_lossy(raw);
    let text = redact_text(&text).into_owned();
    let now = SystemTime::now();
    let heartbeat = rules.heartbeat.as_deref().is_some_and(|p| text.contains(p));
    if heartbeat {
        *launch.last_heartbeat.lock() = Some(Instant::now());
    }
    if rules.readiness.as_deref().is_some_and(|p| text.contains(p))
        && !launch.ready_seen.swap(true, Ordering::SeqCst)
    {
        launch.ready.notify_one();
    }
    let is_error = !heartbeat && {
        let lower = text.to_ascii_lowercase();
        rules
            .error_patterns
            .iter()
            .any(|p| lower.contains(p.as_str()))
    };
    tracing::trace!(
        target: "kvs_frames::producer::output",
        stream = %rules.name,
        pid = rules.pid,
        stderr,
        "{text}"
    );
    let mut out = output.lock();
    if heartbeat {
        out.last_heartbeat = Some(now);
        out.heartbeats_seen += 1;
    }
    if is_error {
        out.last_error = Some(text.clone());
    }
    while out.lines.len() >= out.capacity {
        out.lines.pop_front();
    }
    out.lines.push_back(OutputLine {
        at: now,
        stderr,
        pid: rules.pid,
        text,
    });
}

/// Reads `reader` to its end, line by line, as fast as the child writes: lines are handled
/// in place (no queue that could fill up), and a line longer than [`MAX_LINE_BYTES`] is cut,
/// so neither a flood nor a line without newline can block the child or grow memory.
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    mut reader: R,
    stderr: bool,
    rules: Arc<LineRules>,
    launch: Arc<LaunchSignals>,
    output: Arc<Mutex<OutputBuffer>>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut line: Vec<u8> = Vec::with_capacity(512);
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut chunk = &buf[..n];
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            append_capped(&mut line, &chunk[..pos]);
            handle_line(&line, stderr, &rules, &launch, &output);
            line.clear();
            chunk = &chunk[pos + 1..];
        }
        append_capped(&mut line, chunk);
    }
    if !line.is_empty() {
        handle_line(&line, stderr, &rules, &launch, &output);
    }
}

fn append_capped(line: &mut Vec<u8>, bytes: &[u8]) {
    let room = MAX_LINE_BYTES.saturating_sub(line.len());
    line.extend_from_slice(&bytes[..bytes.len().min(room)]);
}

/// A running producer process: our child, or a process adopted from an earlier supervisor.
pub(crate) enum Proc {
    Child {
        child: Box<tokio::process::Child>,
        pid: u32,
        readers: Vec<JoinHandle<()>>,
    },
    Adopted {
        pid: u32,
        start_ticks: u64,
    },
}

impl Proc {
    pub fn pid(&self) -> u32 {
        match self {
            Proc::Child { pid, .. } | Proc::Adopted { pid, .. } => *pid,
        }
    }

    pub fn pgid(&self) -> i32 {
        i32::try_from(self.pid()).unwrap_or(0)
    }

    pub fn is_adopted(&self) -> bool {
        matches!(self, Proc::Adopted { .. })
    }

    /// Waits for the process to end. Cancel-safe.
    pub async fn wait(&mut self) -> ExitKind {
        match self {
            Proc::Child { child, .. } => match child.wait().await {
                Ok(status) => {
                    use std::os::unix::process::ExitStatusExt;
                    match (status.code(), status.signal()) {
                        (Some(code), _) => ExitKind::Code(code),
                        (None, Some(sig)) => ExitKind::Signal(sig),
                        (None, None) => ExitKind::Unknown,
                    }
                }
                Err(_) => ExitKind::Unknown,
            },
            Proc::Adopted { pid, start_ticks } => {
                let pid = i32::try_from(*pid).unwrap_or(0);
                while procfs::is_alive(pid, Some(*start_ticks)) {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
                ExitKind::Unknown
            }
        }
    }

    /// After the process ended: lets the readers take the last lines (they end when every
    /// writer of the pipes is gone), within `timeout`.
    pub async fn finish_readers(&mut self, timeout: Duration) {
        if let Proc::Child { readers, .. } = self {
            let deadline = Instant::now() + timeout;
            for reader in readers.iter_mut() {
                if tokio::time::timeout_at(deadline, &mut *reader)
                    .await
                    .is_err()
                {
                    reader.abort();
                }
            }
            readers.clear();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Arc<LineRules> {
        Arc::new(LineRules {
            name: "cam".into(),
            pid: 1,
            readiness: Some("ready".into()),
            heartbeat: Some("ack".into()),
            error_patterns: vec!["error".into()],
        })
    }

    #[tokio::test]
    async fn lines_are_split_capped_redacted_and_classified() {
        let mut input = Vec::new();
        input.extend_from_slice(b"hello\r\nnow ready\nfragment ack 1\n");
        input.extend_from_slice(&vec![b'x'; 10_000]);
        input.extend_from_slice(b"\nERROR opening rtsp://admin:hunter2@cam/x\nno newline at end");
        let launch = LaunchSignals::new();
        let output = Arc::new(Mutex::new(OutputBuffer::new(3)));
        drain(&input[..], false, rules(), launch.clone(), output.clone()).await;
        assert!(launch.ready_seen.load(Ordering::SeqCst));
        assert!(launch.last_heartbeat.lock().is_some());
        let out = output.lock();
        let texts: Vec<&str> = out.lines.iter().map(|l| l.text.as_str()).collect();
        assert_eq!(texts.len(), 3, "capacity");
        assert_eq!(texts[0].len(), MAX_LINE_BYTES);
        assert_eq!(texts[1], "ERROR opening rtsp://admin:***@cam/x");
        assert_eq!(texts[2], "no newline at end");
        assert_eq!(
            out.last_error.as_deref(),
            Some("ERROR opening rtsp://admin:***@cam/x")
        );
        assert_eq!(out.heartbeats_seen, 1);
    }

    #[test]
    fn never_signals_own_group_or_init() {
        // SAFETY: no preconditions.
        let own = unsafe { libc::getpgrp() };
        assert!(!signal_group(own, 0));
        assert!(!signal_group(1, 0));
        assert!(!signal_group(0, 0));
        assert!(!signal_pid(1, 0));
        assert!(!signal_pid(i32::try_from(std::process::id()).unwrap(), 0));
    }
}
