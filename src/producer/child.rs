//! Child processes: spawning in a new process group with the supervisor's marker, signals to
//! the group (the leader's identity re-checked before each), exit detection without reaping
//! (a pidfd), reaping within a bound, and draining stdout/stderr line by line without ever
//! blocking the child.
//!
//! A child is reaped only after the last signal to its group: while it is an unreaped zombie,
//! its pid — and so its process group id — cannot be given to another process, so a signal to
//! the group can only reach the child's own group.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::io::unix::AsyncFd;
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tokio::task::JoinHandle;
use tokio::time::Instant;

use super::identity::{self, Check, Identity, NotSent, Reach};
use super::secrets::Secrets;
use super::spec::Rendered;
use super::status::{ExitKind, OutputLine};

/// The supervisor id (the namespace of orphan detection).
pub(crate) const ENV_SUPERVISOR_ID: &str = "KVS_FRAMES_SUPERVISOR_ID";
/// `{pid}.{start_ticks}.{nonce}.{boot_id}.{pid_namespace}` of the supervisor instance that
/// spawned the process.
pub(crate) const ENV_INSTANCE: &str = "KVS_FRAMES_SUPERVISOR_INSTANCE";
/// The producer (stream) name.
pub(crate) const ENV_PRODUCER: &str = "KVS_FRAMES_PRODUCER";

/// Output lines longer than this are cut (after redaction).
pub(crate) const MAX_LINE_BYTES: usize = 4096;

/// How much of a line is read before it is redacted and cut to [`MAX_LINE_BYTES`]: the
/// redaction sees this much, so a secret that straddles the 4096-byte cut is still found.
pub(crate) const RAW_LINE_BYTES: usize = 4 * MAX_LINE_BYTES;

/// What marks a child as ours in its environment.
#[derive(Clone, Debug)]
pub(crate) struct Marker {
    pub id: String,
    pub instance: String,
}

/// A process the supervisor may signal: its identity, and whether it may still be signalled
/// (a child until it is reaped, an adopted process until it is seen gone). Reaping happens
/// under the same lock as signalling, so no signal can follow the reaping.
#[derive(Debug)]
pub(crate) struct ProcHandle {
    pub identity: Identity,
    live: Mutex<bool>,
}

impl ProcHandle {
    pub fn new(identity: Identity) -> Arc<Self> {
        Arc::new(ProcHandle {
            identity,
            live: Mutex::new(true),
        })
    }

    pub fn pid(&self) -> u32 {
        u32::try_from(self.identity.pid).unwrap_or(0)
    }

    /// Sends `signal` to the process group, if the process may still be signalled and its
    /// identity checks out right now.
    pub fn signal_group(&self, signal: i32) -> Result<(), NotSent> {
        let live = self.live.lock();
        if !*live {
            return Err(NotSent::Gone);
        }
        identity::signal(&self.identity, Reach::Group, signal)
    }

    #[cfg(test)]
    pub fn is_live(&self) -> bool {
        *self.live.lock()
    }

    fn mark_gone(&self) {
        *self.live.lock() = false;
    }
}

/// `waitid(P_PID, pid, options)`: the exit status when one is available.
fn waitid(pid: i32, options: libc::c_int) -> io::Result<Option<ExitKind>> {
    let id = libc::id_t::try_from(pid).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    loop {
        // SAFETY: siginfo_t is plain data; zeroed is a valid value.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        // SAFETY: `info` is a valid, writable siginfo_t.
        let r = unsafe { libc::waitid(libc::P_PID, id, &mut info, options) };
        if r != 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        // SAFETY: waitid filled `info` for a child event (or left si_pid 0).
        let (si_pid, status) = unsafe { (info.si_pid(), info.si_status()) };
        if si_pid == 0 {
            return Ok(None);
        }
        return Ok(Some(match info.si_code {
            libc::CLD_EXITED => ExitKind::Code(status),
            libc::CLD_KILLED | libc::CLD_DUMPED => ExitKind::Signal(status),
            _ => ExitKind::Unknown,
        }));
    }
}

fn pidfd_open(pid: i32) -> Option<OwnedFd> {
    // SAFETY: pidfd_open(2) takes a pid and flags and returns a new descriptor or -1.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    let fd = i32::try_from(fd).ok().filter(|&fd| fd >= 0)?;
    // SAFETY: `fd` is a descriptor we just opened and own.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn pidfd_kill(fd: &OwnedFd) {
    use std::os::fd::AsRawFd;
    // SAFETY: pidfd_send_signal(2) on a pidfd of our unreaped child: the kernel guarantees it
    // reaches that very process.
    unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            fd.as_raw_fd(),
            libc::SIGKILL,
            std::ptr::null::<libc::siginfo_t>(),
            0,
        );
    }
}

/// One of our children.
pub(crate) struct ChildProc {
    handle: Arc<ProcHandle>,
    pidfd: Option<AsyncFd<OwnedFd>>,
    exited: bool,
    reaped: Option<ExitKind>,
}

impl ChildProc {
    pub fn handle_ref(&self) -> &Arc<ProcHandle> {
        &self.handle
    }

    /// Resolves once the process has ended (it may still be unreaped). Cancel-safe.
    pub async fn exited(&mut self) {
        if self.exited {
            return;
        }
        if let Some(fd) = &self.pidfd {
            // A pidfd becomes readable when the process ends.
            if let Ok(mut guard) = fd.readable().await {
                guard.retain_ready();
                self.exited = true;
                return;
            }
        }
        // No pidfd (old kernel): poll /proc.
        while self.handle.identity.check() == Check::Alive {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.exited = true;
    }

    /// Reaps the process if it has ended. Never blocks.
    pub fn try_reap(&mut self) -> Option<ExitKind> {
        if let Some(kind) = self.reaped {
            return Some(kind);
        }
        let mut live = self.handle.live.lock();
        let result = match waitid(self.handle.identity.pid, libc::WEXITED | libc::WNOHANG) {
            Ok(Some(kind)) => Some(kind),
            Ok(None) => None,
            // Someone else reaped it (a `waitpid(-1)` elsewhere in the process).
            Err(e) if e.raw_os_error() == Some(libc::ECHILD) => Some(ExitKind::Unknown),
            Err(_) => None,
        };
        if result.is_some() {
            *live = false;
            self.reaped = result;
        }
        result
    }
}

impl Drop for ChildProc {
    /// A child dropped unreaped (its runner was dropped with the runtime, or gave up on it):
    /// SIGKILL to its group and reaping in a background thread, for at most 30 s.
    fn drop(&mut self) {
        if self.reaped.is_some() {
            return;
        }
        let _ = self.handle.signal_group(libc::SIGKILL);
        if self.try_reap().is_some() {
            return;
        }
        let handle = self.handle.clone();
        let _ = std::thread::Builder::new()
            .name("kvs-producer-reaper".into())
            .spawn(move || {
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while std::time::Instant::now() < deadline {
                    let mut live = handle.live.lock();
                    if !*live {
                        return;
                    }
                    match waitid(handle.identity.pid, libc::WEXITED | libc::WNOHANG) {
                        Ok(None) => {}
                        _ => {
                            *live = false;
                            return;
                        }
                    }
                    drop(live);
                    std::thread::sleep(Duration::from_millis(100));
                }
            });
    }
}

/// A spawned child and its output pipes.
pub(crate) struct Spawned {
    pub child: ChildProc,
    pub stdout: Option<pipe::Receiver>,
    pub stderr: Option<pipe::Receiver>,
}

/// Spawns the rendered command in a new process group, stdin closed, stdout/stderr piped,
/// with the marker variables, and with SIGINT/SIGTERM/SIGQUIT/SIGHUP restored to their
/// defaults (a supervisor started in the background may ignore SIGINT, and children inherit
/// ignored signals). Must run inside a tokio runtime.
pub(crate) fn spawn(rendered: &Rendered, marker: &Marker, name: &str) -> io::Result<Spawned> {
    let mut cmd = std::process::Command::new(&rendered.program);
    cmd.args(&rendered.args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .envs(rendered.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(ENV_SUPERVISOR_ID, &marker.id)
        .env(ENV_INSTANCE, &marker.instance)
        .env(ENV_PRODUCER, name)
        .process_group(0);
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
    let mut child = cmd.spawn()?;
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::other("the child's pid does not fit an i32"))?;
    // The child is unreaped: this pidfd refers to it and to nothing else.
    let pidfd = pidfd_open(pid);
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let identity = match Identity::of(pid) {
        Ok(identity) => identity,
        Err(e) => {
            if let Some(fd) = &pidfd {
                pidfd_kill(fd);
                let deadline = std::time::Instant::now() + Duration::from_secs(2);
                while matches!(waitid(pid, libc::WEXITED | libc::WNOHANG), Ok(None))
                    && std::time::Instant::now() < deadline
                {
                    std::thread::sleep(Duration::from_millis(10));
                }
            }
            return Err(io::Error::other(format!(
                "cannot read /proc/{pid}/stat of the new process ({e}): the supervisor needs /proc"
            )));
        }
    };
    let child = ChildProc {
        handle: ProcHandle::new(identity),
        // SAFETY: the descriptor is owned by the AsyncFd and stays open for its lifetime.
        pidfd: pidfd.and_then(|fd| unsafe { AsyncFd::register(fd) }.ok()),
        exited: false,
        reaped: None,
    };
    // From here on, dropping `child` kills and reaps the process.
    let stdout = stdout.map(pipe::Receiver::from_owned_fd).transpose()?;
    let stderr = stderr.map(pipe::Receiver::from_owned_fd).transpose()?;
    Ok(Spawned {
        child,
        stdout,
        stderr,
    })
}

/// A process adopted from an earlier supervisor: not our child, watched through `/proc`.
pub(crate) struct AdoptedProc {
    handle: Arc<ProcHandle>,
}

impl AdoptedProc {
    pub fn new(identity: Identity) -> Self {
        AdoptedProc {
            handle: ProcHandle::new(identity),
        }
    }
}

/// A running producer process: our child, or a process adopted from an earlier supervisor.
pub(crate) enum Proc {
    Child {
        child: ChildProc,
        readers: Vec<JoinHandle<()>>,
    },
    Adopted(AdoptedProc),
}

impl Proc {
    pub fn handle(&self) -> &Arc<ProcHandle> {
        match self {
            Proc::Child { child, .. } => &child.handle,
            Proc::Adopted(a) => &a.handle,
        }
    }

    pub fn pid(&self) -> u32 {
        self.handle().pid()
    }

    pub fn is_adopted(&self) -> bool {
        matches!(self, Proc::Adopted(_))
    }

    /// Signals the process group (identity re-checked). Failures are logged at debug level.
    pub fn signal_group(&self, signal: i32) -> bool {
        match self.handle().signal_group(signal) {
            Ok(()) => true,
            Err(why) => {
                tracing::debug!(pid = self.pid(), signal, ?why, "signal not sent");
                false
            }
        }
    }

    /// Resolves once the process has ended (a child may still be unreaped). Cancel-safe.
    pub async fn exited(&mut self) {
        match self {
            Proc::Child { child, .. } => child.exited().await,
            Proc::Adopted(a) => {
                while a.handle.identity.check() == Check::Alive {
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            }
        }
    }

    /// Reaps an ended process (an adopted one: notes that it is gone). Never blocks.
    pub fn try_reap(&mut self) -> Option<ExitKind> {
        match self {
            Proc::Child { child, .. } => child.try_reap(),
            Proc::Adopted(a) => (a.handle.identity.check() != Check::Alive).then(|| {
                a.handle.mark_gone();
                ExitKind::Unknown
            }),
        }
    }

    /// Reaps an ended process, trying until `deadline`: `None` when it could not be reaped
    /// (still running after SIGKILL, or held by a tracer).
    pub async fn reap_until(&mut self, deadline: Instant) -> Option<ExitKind> {
        loop {
            if let Some(kind) = self.try_reap() {
                return Some(kind);
            }
            if Instant::now() >= deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
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
    /// The producer's secrets, redacted from every line before anything else looks at it.
    pub secrets: Secrets,
}

/// One line: redacted first (with the whole of it that was read, up to [`RAW_LINE_BYTES`];
/// `cut` when more followed), then cut to [`MAX_LINE_BYTES`], then classified.
fn handle_line(
    raw: &[u8],
    cut: bool,
    stderr: bool,
    rules: &LineRules,
    launch: &LaunchSignals,
    output: &Mutex<OutputBuffer>,
) {
    let raw = if cut {
        raw
    } else {
        raw.strip_suffix(b"\r").unwrap_or(raw)
    };
    let text = String::from_utf8_lossy(raw);
    let text = rules.secrets.redact_cut(&text, cut, MAX_LINE_BYTES);
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
/// in place (no queue that could fill up), and a line longer than [`RAW_LINE_BYTES`] is cut
/// there (then redacted, then cut to [`MAX_LINE_BYTES`]), so neither a flood nor a line
/// without newline can block the child or grow memory.
pub(crate) async fn drain<R: AsyncRead + Unpin>(
    mut reader: R,
    stderr: bool,
    rules: Arc<LineRules>,
    launch: Arc<LaunchSignals>,
    output: Arc<Mutex<OutputBuffer>>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    let mut line: Vec<u8> = Vec::with_capacity(512);
    let mut cut = false;
    loop {
        let n = match reader.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(_) => break,
        };
        let mut chunk = &buf[..n];
        while let Some(pos) = chunk.iter().position(|&b| b == b'\n') {
            cut |= append_capped(&mut line, &chunk[..pos]);
            handle_line(&line, cut, stderr, &rules, &launch, &output);
            line.clear();
            cut = false;
            chunk = &chunk[pos + 1..];
        }
        cut |= append_capped(&mut line, chunk);
    }
    if !line.is_empty() {
        handle_line(&line, cut, stderr, &rules, &launch, &output);
    }
}

/// Appends what fits in [`RAW_LINE_BYTES`]; true when some bytes did not fit.
fn append_capped(line: &mut Vec<u8>, bytes: &[u8]) -> bool {
    let room = RAW_LINE_BYTES.saturating_sub(line.len());
    let take = bytes.len().min(room);
    line.extend_from_slice(&bytes[..take]);
    take < bytes.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(secrets: Secrets) -> Arc<LineRules> {
        Arc::new(LineRules {
            name: "cam".into(),
            pid: 1,
            readiness: Some("ready".into()),
            heartbeat: Some("ack".into()),
            error_patterns: vec!["error".into()],
            secrets,
        })
    }

    async fn lines_of(input: &[u8], capacity: usize, secrets: Secrets) -> Vec<String> {
        let launch = LaunchSignals::new();
        let output = Arc::new(Mutex::new(OutputBuffer::new(capacity)));
        drain(input, false, rules(secrets), launch, output.clone()).await;
        let out = output.lock();
        out.lines.iter().map(|l| l.text.clone()).collect()
    }

    #[tokio::test]
    async fn lines_are_split_capped_redacted_and_classified() {
        let mut input = Vec::new();
        input.extend_from_slice(b"hello\r\nnow ready\nfragment ack 1\n");
        input.extend_from_slice(&vec![b'x'; 100_000]);
        input.extend_from_slice(b"\nERROR opening rtsp://admin:hunter2@cam/x\nno newline at end");
        let launch = LaunchSignals::new();
        let output = Arc::new(Mutex::new(OutputBuffer::new(3)));
        drain(
            &input[..],
            false,
            rules(Secrets::default()),
            launch.clone(),
            output.clone(),
        )
        .await;
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

    /// The old order (cut at 4096 bytes, then redact) showed the password of a URL whose `@`
    /// fell after the cut.
    #[tokio::test]
    async fn a_secret_straddling_the_cut_is_redacted_first() {
        let url = "rtsp://admin:hunter2@cam/x";
        // The password ends exactly at byte 4096: `@` is the first byte cut off.
        let pad = MAX_LINE_BYTES - "rtsp://admin:hunter2".len();
        let line = format!("{}{url} and more\n", "p".repeat(pad));
        for chunk in [1, 7, 4096, 1 << 16] {
            // Delivered in bursts of `chunk` bytes.
            let launch = LaunchSignals::new();
            let output = Arc::new(Mutex::new(OutputBuffer::new(10)));
            let (mut tx, rx) = tokio::io::duplex(chunk);
            let reader = tokio::spawn(drain(
                rx,
                false,
                rules(Secrets::default()),
                launch,
                output.clone(),
            ));
            for part in line.as_bytes().chunks(chunk) {
                tokio::io::AsyncWriteExt::write_all(&mut tx, part)
                    .await
                    .unwrap();
            }
            drop(tx);
            reader.await.unwrap();
            let text = output.lock().lines[0].text.clone();
            assert_eq!(text.len(), MAX_LINE_BYTES, "chunk {chunk}");
            assert!(
                text.ends_with("rtsp://admin:***@cam"),
                "chunk {chunk}: {}",
                &text[4000..]
            );
            assert!(
                !text.contains("hunter2") && !text.contains("hunt"),
                "chunk {chunk}"
            );
        }
        // A line longer than the raw cap: the secrets within the first 4096 bytes of output
        // are found whatever follows.
        for tail in [
            "rtsp://admin:hunter2@cam",
            "user-pw=hunter2",
            "we use hunter2",
        ] {
            let pad = MAX_LINE_BYTES - 20;
            let line = format!("{}{tail}{}", "x".repeat(pad), " ".repeat(RAW_LINE_BYTES));
            let texts = lines_of(line.as_bytes(), 1, Secrets::new(["hunter2".to_owned()])).await;
            assert_eq!(texts[0].len(), MAX_LINE_BYTES);
            assert!(!texts[0].contains("hunt"), "{tail}: {}", &texts[0][pad..]);
        }
        // Known values are hidden whole, even where no rule would find them.
        let texts = lines_of(
            b"connecting with hunter2 as password\n",
            1,
            Secrets::new(["hunter2".to_owned()]),
        )
        .await;
        assert_eq!(texts, ["connecting with <redacted> as password"]);
    }

    #[tokio::test]
    async fn a_child_is_reaped_only_after_the_group_signal() {
        let rendered = Rendered {
            program: "/bin/sh".into(),
            args: vec!["-c".into(), "sleep 30 & wait".into()],
            working_dir: None,
            env: Vec::new(),
            readiness_line: None,
            heartbeat_line: None,
            warnings: Vec::new(),
            secrets: Secrets::default(),
        };
        let marker = Marker {
            id: "unit".into(),
            instance: "x".into(),
        };
        let spawned = spawn(&rendered, &marker, "cam").unwrap();
        let mut proc = Proc::Child {
            child: spawned.child,
            readers: Vec::new(),
        };
        let pid = proc.pid();
        assert!(proc.handle().is_live());
        assert!(proc.try_reap().is_none(), "still running");
        assert!(proc.signal_group(libc::SIGKILL));
        tokio::time::timeout(Duration::from_secs(10), proc.exited())
            .await
            .unwrap();
        let kind = proc
            .reap_until(Instant::now() + Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(kind, ExitKind::Signal(libc::SIGKILL));
        assert!(!proc.handle().is_live());
        // Reaped: never signalled again, whatever now has its pid.
        assert!(!proc.signal_group(0));
        assert!(!std::path::Path::new(&format!("/proc/{pid}")).exists() || pid == 0);
    }
}
