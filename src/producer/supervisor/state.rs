//! The state of one producer shared between its runner, the sampler and the API: the status
//! record, its snapshots and health, and how a spec and a restart update it.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;

use crate::producer::child::{OutputBuffer, ProcHandle};
use crate::producer::health::assess;
use crate::producer::spec::{ProducerSpec, Rendered};
use crate::producer::status::{
    LastExit, ProducerHealth, ProducerState, ProducerStatus, RestartReason,
};

/// The state of one producer shared between its runner, the sampler and the API.
pub(crate) struct ProducerShared {
    pub(super) name: String,
    pub(crate) status: Mutex<StatusInner>,
    pub(super) output: Arc<Mutex<OutputBuffer>>,
    /// The current process (its pid is its process group), while it may be signalled.
    pub(super) process: Mutex<Option<Arc<ProcHandle>>>,
}

pub(crate) struct StatusInner {
    pub kind: &'static str,
    pub rtsp_url: String,
    pub command: String,
    pub warnings: Vec<String>,
    pub state: ProducerState,
    pub state_since: SystemTime,
    pub state_reason: String,
    pub pid: Option<u32>,
    pub adopted: bool,
    pub started_at: Option<SystemTime>,
    pub started_instant: Option<Instant>,
    pub restarts: u64,
    pub by_reason: BTreeMap<RestartReason, u64>,
    pub recent_restarts: VecDeque<(Instant, RestartReason)>,
    pub consecutive_restarts: u32,
    pub failed_starts: usize,
    pub next_start_at: Option<Instant>,
    pub last_exit: Option<LastExit>,
    pub last_supervisor_error: Option<String>,
    pub cpu_percent: Option<f64>,
    pub rss_bytes: Option<u64>,
    pub heartbeat_line: Option<String>,
    pub stall_timeout: Option<Duration>,
    /// Heartbeats seen before the producer was (re)started by the user.
    pub heartbeats_at_activation: u64,
    /// The spec it runs (for restarting a stopped producer).
    pub spec: Option<ProducerSpec>,
    /// Pids that survived SIGKILL (or could not be reaped), until they are reaped.
    pub unkillable: Vec<u32>,
}

impl ProducerShared {
    pub(super) fn snapshot(&self) -> ProducerStatus {
        let (last_error, last_heartbeat) = {
            let out = self.output.lock();
            (out.last_error.clone(), out.last_heartbeat)
        };
        let s = self.status.lock();
        let now = Instant::now();
        // The supervisor's own reason (spawn failure, gave up) wins when it is newer than
        // the process's last error line: it is set last.
        let last_error = s.last_supervisor_error.clone().or(last_error);
        ProducerStatus {
            stream_name: self.name.clone(),
            kind: s.kind,
            rtsp_url: s.rtsp_url.clone(),
            command: s.command.clone(),
            state: s.state,
            state_since: s.state_since,
            state_reason: s.state_reason.clone(),
            pid: s.pid,
            adopted: s.adopted,
            started_at: s.started_at,
            uptime: s.started_instant.map(|t| now.duration_since(t)),
            restarts: s.restarts,
            restarts_by_reason: s.by_reason.iter().map(|(r, n)| (*r, *n)).collect(),
            consecutive_restarts: s.consecutive_restarts,
            failed_starts: s.failed_starts,
            next_start_in: s
                .next_start_at
                .filter(|_| s.state == ProducerState::Backoff)
                .map(|t| t.saturating_duration_since(now)),
            last_exit: s.last_exit,
            last_error,
            last_heartbeat: last_heartbeat.filter(|_| s.pid.is_some()),
            cpu_percent: s.cpu_percent,
            rss_bytes: s.rss_bytes,
            warnings: s.warnings.clone(),
            unkillable_pids: s.unkillable.clone(),
        }
    }

    pub(super) fn health(&self) -> ProducerHealth {
        let status = self.snapshot();
        // Lock order: never hold `output` and `status` together.
        let heartbeats_seen = self.output.lock().heartbeats_seen;
        let s = self.status.lock();
        assess(
            &status,
            &s,
            heartbeats_seen.saturating_sub(s.heartbeats_at_activation),
        )
    }
}

pub(super) fn new_status(spec: &ProducerSpec, rendered: &Rendered) -> StatusInner {
    let mut s = StatusInner {
        kind: spec.command.kind(),
        rtsp_url: String::new(),
        command: String::new(),
        warnings: Vec::new(),
        state: ProducerState::Stopped,
        state_since: SystemTime::now(),
        state_reason: String::new(),
        pid: None,
        adopted: false,
        started_at: None,
        started_instant: None,
        restarts: 0,
        by_reason: BTreeMap::new(),
        recent_restarts: VecDeque::new(),
        consecutive_restarts: 0,
        failed_starts: 0,
        next_start_at: None,
        last_exit: None,
        last_supervisor_error: None,
        cpu_percent: None,
        rss_bytes: None,
        heartbeat_line: None,
        stall_timeout: None,
        heartbeats_at_activation: 0,
        spec: None,
        unkillable: Vec::new(),
    };
    apply_spec(&mut s, spec, rendered);
    s
}

pub(super) fn apply_spec(s: &mut StatusInner, spec: &ProducerSpec, rendered: &Rendered) {
    s.kind = spec.command.kind();
    s.rtsp_url = rendered
        .secrets
        .redact(&spec.rtsp_url.redacted())
        .into_owned();
    s.command = rendered.display();
    s.warnings = rendered
        .warnings
        .iter()
        .map(|w| rendered.secrets.redact(w).into_owned())
        .collect();
    s.heartbeat_line = rendered.heartbeat_line.clone();
    s.stall_timeout = spec
        .stall_timeout
        .filter(|_| rendered.heartbeat_line.is_some());
    s.spec = Some(spec.clone());
}

pub(super) fn count_restart(s: &mut StatusInner, reason: RestartReason) {
    s.restarts += 1;
    *s.by_reason.entry(reason).or_insert(0) += 1;
    let now = Instant::now();
    s.recent_restarts.push_back((now, reason));
    while s.recent_restarts.len() > 100
        || s.recent_restarts
            .front()
            .is_some_and(|(t, _)| now.duration_since(*t) > Duration::from_secs(3600))
    {
        s.recent_restarts.pop_front();
    }
}
