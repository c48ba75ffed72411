//! The task that runs one producer ([`Runner`]): launch (spawn or adopt), state transitions
//! with their events and metrics, backoff between restarts, Fatal.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use rand::Rng;
use rand::rngs::StdRng;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::time::{Instant, sleep_until};

use crate::error::{Error, ErrorKind, Result};
use crate::producer::child::{self, AdoptedProc, LaunchSignals, LineRules, Marker, Proc};
use crate::producer::identity::Check;
use crate::producer::ledger::{Ledger, LedgerEntry};
use crate::producer::metrics::ProducerMetrics;
use crate::producer::orphans::{Adoptable, deadline_after};
use crate::producer::restart::{Decision, RestartTracker};
use crate::producer::spec::{ProducerSpec, Rendered};
use crate::producer::status::{
    ExitKind, LastExit, ProducerEvent, ProducerState, RestartReason, StopMode,
};

use super::human;
use super::state::{ProducerShared, count_restart};

pub(super) enum Command {
    Stop {
        mode: StopMode,
        reply: oneshot::Sender<()>,
    },
    Restart {
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown,
}

/// How the supervision of one process ended.
pub(super) enum Outcome {
    /// Ended without being asked to.
    Exited {
        exit: ExitKind,
        was_running: bool,
        ran_for: Duration,
    },
    /// Stopped because its heartbeat stopped.
    Stalled { silent_for: Duration },
    /// Stopped by request (replies pending in `stop_replies`).
    Stopped,
    /// Stopped for a manual restart.
    Restart,
    /// The supervisor is gone.
    Shutdown,
}

pub(super) struct Runner {
    pub(super) name: String,
    pub(super) spec: ProducerSpec,
    pub(super) rendered: Rendered,
    pub(super) producer: Arc<ProducerShared>,
    pub(super) events: broadcast::Sender<ProducerEvent>,
    pub(super) metrics: Option<ProducerMetrics>,
    pub(super) rng: Arc<Mutex<StdRng>>,
    pub(super) marker: Marker,
    pub(super) adoptable: Arc<Mutex<HashMap<String, Adoptable>>>,
    pub(super) ledger: Arc<Ledger>,
    pub(super) kill_timeout: Duration,
    pub(super) tracker: RestartTracker,
    pub(super) cmds: mpsc::UnboundedReceiver<Command>,
    /// Callers waiting for the next launch (start, restart).
    pub(super) pending_starts: Vec<oneshot::Sender<Result<()>>>,
    /// Callers waiting for the stop to complete.
    pub(super) stop_replies: Vec<oneshot::Sender<()>>,
    pub(super) shutdown: bool,
    /// Whether a process was launched (a failed first launch is the caller's error).
    pub(super) launched_once: bool,
    /// The current process was found unkillable: it goes to the late reaper.
    pub(super) unkillable: bool,
}

impl Runner {
    pub(super) fn transition(
        &self,
        to: ProducerState,
        reason: &str,
        restart_reason: Option<RestartReason>,
    ) {
        let reason = self.rendered.secrets.redact(reason).into_owned();
        let (from, pid) = {
            let mut s = self.producer.status.lock();
            let from = s.state;
            s.state = to;
            s.state_since = SystemTime::now();
            s.state_reason = reason.clone();
            if to != ProducerState::Backoff {
                s.next_start_at = None;
            }
            (from, s.pid)
        };
        if let Some(m) = &self.metrics {
            m.set_state(&self.name, to);
        }
        match to {
            ProducerState::Backoff | ProducerState::Fatal | ProducerState::Unkillable => {
                tracing::warn!(stream = %self.name, pid, from = %from, to = %to, "{reason}");
            }
            _ => tracing::info!(stream = %self.name, pid, from = %from, to = %to, "{reason}"),
        }
        let _ = self.events.send(ProducerEvent {
            stream_name: self.name.clone(),
            at: SystemTime::now(),
            from,
            to,
            reason,
            restart_reason,
            pid,
        });
    }

    fn jitter_unit(&self) -> f64 {
        self.rng.lock().random::<f64>()
    }

    fn record_restart(&self, reason: RestartReason) {
        count_restart(&mut self.producer.status.lock(), reason);
        if let Some(m) = &self.metrics {
            m.restart(&self.name, reason);
        }
    }

    fn answer_starts(&mut self, result: &Result<()>) {
        for tx in self.pending_starts.drain(..) {
            let _ = tx.send(result.clone());
        }
    }

    fn answer_stops(&mut self) {
        for tx in self.stop_replies.drain(..) {
            let _ = tx.send(());
        }
    }

    fn clear_process(&self) {
        *self.producer.process.lock() = None;
        let mut s = self.producer.status.lock();
        s.pid = None;
        s.adopted = false;
        s.started_instant = None;
        s.cpu_percent = None;
        s.rss_bytes = None;
    }

    pub(super) fn record_exit(&self, pid: u32, kind: ExitKind, requested: bool) {
        self.producer.status.lock().last_exit = Some(LastExit {
            kind,
            at: SystemTime::now(),
            requested,
            pid,
        });
    }

    pub(super) async fn run(mut self) {
        loop {
            self.unkillable = false;
            let launched = self.launch();
            let (mut proc, launch) = match launched {
                Ok(ok) => {
                    self.launched_once = true;
                    self.answer_starts(&Ok(()));
                    ok
                }
                Err(e) => {
                    self.producer.status.lock().last_supervisor_error = Some(e.to_string());
                    if !self.launched_once && !self.pending_starts.is_empty() {
                        // The caller's start failed: report it, do not loop.
                        self.transition(
                            ProducerState::Stopped,
                            &format!("cannot start: {e}"),
                            None,
                        );
                        self.answer_starts(&Err(e));
                        self.answer_stops();
                        return;
                    }
                    self.answer_starts(&Err(e.clone()));
                    let decision =
                        self.tracker
                            .on_failure(Instant::now(), true, self.jitter_unit());
                    if self
                        .backoff_or_fatal(
                            decision,
                            &format!("cannot spawn: {e}"),
                            RestartReason::SpawnFailure,
                        )
                        .await
                    {
                        continue;
                    }
                    return;
                }
            };
            let outcome = self.supervise(&mut proc, &launch).await;
            let pid = proc.pid();
            self.clear_process();
            if self.unkillable {
                self.hand_to_late_reaper(proc);
            } else {
                let identity = &proc.handle().identity;
                self.ledger.remove(identity.pid, identity.start_ticks);
                drop(proc);
            }
            match outcome {
                Outcome::Exited {
                    exit,
                    was_running,
                    ran_for,
                } => {
                    if !self.unkillable {
                        self.record_exit(pid, exit, false);
                    }
                    let reason = match exit {
                        ExitKind::Code(0) => RestartReason::ExitSuccess,
                        ExitKind::Code(_) => RestartReason::ExitFailure,
                        ExitKind::Signal(_) => RestartReason::Signal,
                        ExitKind::Unknown => RestartReason::ExitFailure,
                    };
                    let last_error = self.producer.output.lock().last_error.clone();
                    let mut what = format!(
                        "pid {pid} {exit} after {}{}",
                        human(ran_for),
                        if was_running {
                            ""
                        } else {
                            " (before it was running)"
                        }
                    );
                    if let Some(line) = last_error {
                        what.push_str("; last error line: ");
                        what.push_str(&line);
                    }
                    let decision =
                        self.tracker
                            .on_failure(Instant::now(), !was_running, self.jitter_unit());
                    if !self.backoff_or_fatal(decision, &what, reason).await {
                        return;
                    }
                }
                Outcome::Stalled { silent_for } => {
                    let decision =
                        self.tracker
                            .on_failure(Instant::now(), false, self.jitter_unit());
                    let what = format!(
                        "pid {pid} printed no heartbeat for {} (stall_timeout): stopped",
                        human(silent_for)
                    );
                    if !self
                        .backoff_or_fatal(decision, &what, RestartReason::Stall)
                        .await
                    {
                        return;
                    }
                }
                Outcome::Stopped => {
                    // An unkillable process stays reported as such.
                    if !self.unkillable {
                        self.transition(ProducerState::Stopped, "stopped by request", None);
                    }
                    self.answer_stops();
                    return;
                }
                Outcome::Restart => {
                    self.record_restart(RestartReason::Manual);
                    self.tracker.reset();
                    self.sync_tracker();
                }
                Outcome::Shutdown => {
                    if !self.unkillable {
                        self.transition(ProducerState::Stopped, "supervisor dropped", None);
                    }
                    self.answer_stops();
                    return;
                }
            }
        }
    }

    pub(super) fn sync_tracker(&self) {
        let mut s = self.producer.status.lock();
        s.consecutive_restarts = self.tracker.attempts();
        s.failed_starts = self.tracker.failed_starts();
    }

    /// Enters Backoff and waits for the delay (returns true: launch again), or enters Fatal
    /// (false). Commands during the delay: stop → Stopped (false); restart → launch now.
    async fn backoff_or_fatal(
        &mut self,
        decision: Decision,
        what: &str,
        reason: RestartReason,
    ) -> bool {
        self.sync_tracker();
        match decision {
            Decision::Fatal { failed_starts } => {
                let interval = self
                    .spec
                    .restart
                    .start_limit
                    .map_or(Duration::ZERO, |l| l.interval);
                let message = format!(
                    "gave up after {failed_starts} failed starts within {}: {what}",
                    human(interval)
                );
                let message = self.rendered.secrets.redact(&message).into_owned();
                self.producer.status.lock().last_supervisor_error = Some(message.clone());
                self.transition(ProducerState::Fatal, &message, Some(reason));
                self.answer_starts(&Err(Error::new(ErrorKind::Stopped, message)));
                self.answer_stops();
                false
            }
            Decision::Backoff { delay, attempt } => {
                self.record_restart(reason);
                let deadline = deadline_after(delay);
                self.producer.status.lock().next_start_at = Some(deadline);
                self.transition(
                    ProducerState::Backoff,
                    &format!("{what}; restart #{attempt} in {}", human(delay)),
                    Some(reason),
                );
                tokio::select! {
                    () = sleep_until(deadline) => true,
                    cmd = self.cmds.recv() => match cmd {
                        Some(Command::Stop { reply, .. }) => {
                            self.stop_replies.push(reply);
                            self.transition(
                                ProducerState::Stopped,
                                "stopped by request during backoff",
                                None,
                            );
                            self.answer_stops();
                            false
                        }
                        Some(Command::Restart { reply }) => {
                            self.pending_starts.push(reply);
                            self.record_restart(RestartReason::Manual);
                            self.tracker.reset();
                            self.sync_tracker();
                            true
                        }
                        Some(Command::Shutdown) | None => {
                            self.transition(
                                ProducerState::Stopped,
                                "supervisor dropped",
                                None,
                            );
                            false
                        }
                    }
                }
            }
        }
    }

    /// Spawns (or adopts) the process and enters Starting (or Running when adopted).
    fn launch(&mut self) -> Result<(Proc, Arc<LaunchSignals>)> {
        let launch = LaunchSignals::new();
        let adopted = self.adoptable.lock().remove(&self.name);
        if let Some(orphan) = adopted {
            if orphan.identity.check() == Check::Alive {
                let proc = Proc::Adopted(AdoptedProc::new(orphan.identity.clone()));
                *self.producer.process.lock() = Some(proc.handle().clone());
                let pid = proc.pid();
                {
                    let mut s = self.producer.status.lock();
                    s.pid = Some(pid);
                    s.adopted = true;
                    s.started_at = orphan.started_at;
                    s.started_instant = Some(
                        orphan
                            .started_at
                            .and_then(|t| t.elapsed().ok())
                            .and_then(|age| Instant::now().checked_sub(age))
                            .unwrap_or_else(Instant::now),
                    );
                    s.last_supervisor_error = None;
                }
                self.transition(
                    ProducerState::Running,
                    &format!(
                        "adopted pid {pid} left by an earlier supervisor (no output or heartbeat \
                         is available for it)"
                    ),
                    None,
                );
                return Ok((proc, launch));
            }
            // Gone meanwhile (pruned late): forget it.
            self.ledger
                .remove(orphan.identity.pid, orphan.identity.start_ticks);
        }
        let spawned = child::spawn(&self.rendered, &self.marker, &self.name).map_err(|e| {
            Error::from(e).context(format!(
                "producer {}: spawning {}",
                self.name,
                self.rendered.program.display()
            ))
        })?;
        let child = spawned.child;
        let proc_handle = child.handle_ref().clone();
        let pid = proc_handle.pid();
        self.ledger.add(LedgerEntry {
            pid: proc_handle.identity.pid,
            start_ticks: proc_handle.identity.start_ticks,
            stream: self.name.clone(),
            marker: self.marker.instance.clone(),
        });
        let rules = Arc::new(LineRules {
            name: self.name.clone(),
            pid,
            readiness: self.rendered.readiness_line.clone(),
            heartbeat: self.rendered.heartbeat_line.clone(),
            error_patterns: self
                .spec
                .error_patterns
                .iter()
                .map(|p| p.to_ascii_lowercase())
                .collect(),
            secrets: self.rendered.secrets.clone(),
        });
        let mut readers = Vec::new();
        if let Some(stdout) = spawned.stdout {
            readers.push(tokio::spawn(child::drain(
                stdout,
                false,
                rules.clone(),
                launch.clone(),
                self.producer.output.clone(),
            )));
        }
        if let Some(stderr) = spawned.stderr {
            readers.push(tokio::spawn(child::drain(
                stderr,
                true,
                rules,
                launch.clone(),
                self.producer.output.clone(),
            )));
        }
        *self.producer.process.lock() = Some(proc_handle);
        {
            let mut s = self.producer.status.lock();
            s.pid = Some(pid);
            s.adopted = false;
            s.started_at = Some(SystemTime::now());
            s.started_instant = Some(Instant::now());
            s.cpu_percent = None;
            s.rss_bytes = None;
            s.last_supervisor_error = None;
        }
        self.transition(
            ProducerState::Starting,
            &format!("spawned pid {pid}: {}", self.rendered.display()),
            None,
        );
        Ok((Proc::Child { child, readers }, launch))
    }
}
