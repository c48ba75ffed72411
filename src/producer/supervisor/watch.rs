//! Watching one process of a [`Runner`]: readiness line or `start_secs`, the stable period,
//! the stall watchdog, and the commands that arrive while it runs.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::{Instant, sleep_until};

use crate::producer::child::{LaunchSignals, Proc};
use crate::producer::orphans::deadline_after;
use crate::producer::status::{ExitKind, ProducerState, RestartReason, StopMode};

use super::runner::{Command, Outcome, Runner};
use super::{READER_GRACE, human};

impl Runner {
    /// Watches one process until it ends or is stopped.
    pub(super) async fn supervise(
        &mut self,
        proc: &mut Proc,
        launch: &Arc<LaunchSignals>,
    ) -> Outcome {
        let started = Instant::now();
        let mut running = proc.is_adopted();
        let mut running_since = started;
        let start_deadline = started
            .checked_add(self.spec.start_secs)
            .unwrap_or_else(|| deadline_after(Duration::MAX));
        let stall = if proc.is_adopted() {
            None
        } else {
            self.spec
                .stall_timeout
                .filter(|_| self.rendered.heartbeat_line.is_some())
        };
        let check_every = stall.map_or(Duration::from_secs(3600), |s| {
            (s / 4).clamp(Duration::from_millis(50), Duration::from_secs(1))
        });
        let mut check = tokio::time::interval(check_every);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let stable_after = self.spec.restart.stable_after;
        let after = |t: Instant, d: Duration| {
            t.checked_add(d)
                .unwrap_or_else(|| deadline_after(Duration::MAX))
        };
        let mut stable_deadline = running.then(|| after(started, stable_after));
        loop {
            tokio::select! {
                cmd = self.cmds.recv() => match cmd {
                    Some(Command::Stop { mode, reply }) => {
                        self.stop_replies.push(reply);
                        let how = match mode {
                            StopMode::Graceful => "stop requested: SIGINT to the process group",
                            StopMode::Force => "forced stop requested: SIGKILL to the process group",
                        };
                        self.transition(ProducerState::Stopping, how, None);
                        let ended = self.stop_process(proc, mode).await;
                        self.after_stop(proc.pid(), ended);
                        return if self.shutdown { Outcome::Shutdown } else { Outcome::Stopped };
                    }
                    Some(Command::Restart { reply }) => {
                        self.pending_starts.push(reply);
                        self.transition(
                            ProducerState::Stopping,
                            "restart requested: SIGINT to the process group",
                            Some(RestartReason::Manual),
                        );
                        let ended = self.stop_process(proc, StopMode::Graceful).await;
                        self.after_stop(proc.pid(), ended);
                        return if self.shutdown {
                            Outcome::Shutdown
                        } else if !self.stop_replies.is_empty() {
                            Outcome::Stopped
                        } else {
                            Outcome::Restart
                        };
                    }
                    Some(Command::Shutdown) | None => {
                        self.shutdown = true;
                        let ended = self.stop_process(proc, StopMode::Force).await;
                        self.after_stop(proc.pid(), ended);
                        return Outcome::Shutdown;
                    }
                },
                () = proc.exited() => {
                    // Stragglers of the group (a shell's children) go with the leader, while
                    // the unreaped leader still holds the group id.
                    proc.signal_group(libc::SIGKILL);
                    let reaped = proc.reap_until(deadline_after(self.kill_timeout)).await;
                    proc.finish_readers(READER_GRACE).await;
                    let exit = match reaped {
                        Some(exit) => exit,
                        None => {
                            let why = format!(
                                "ended but could not be reaped within {}",
                                human(self.kill_timeout)
                            );
                            self.mark_unkillable(proc.pid(), &why);
                            ExitKind::Unknown
                        }
                    };
                    return Outcome::Exited { exit, was_running: running, ran_for: started.elapsed() };
                }
                () = launch.ready.notified(), if !running => {
                    running = true;
                    running_since = Instant::now();
                    stable_deadline = Some(after(running_since, stable_after));
                    self.transition(ProducerState::Running, "printed its readiness line", None);
                }
                () = sleep_until(start_deadline), if !running => {
                    running = true;
                    running_since = Instant::now();
                    stable_deadline = Some(after(running_since, stable_after));
                    self.transition(
                        ProducerState::Running,
                        &format!("alive for {} (start_secs)", human(self.spec.start_secs)),
                        None,
                    );
                }
                () = sleep_until(stable_deadline.unwrap_or(started)), if stable_deadline.is_some() => {
                    stable_deadline = None;
                    self.tracker.on_stable();
                    self.sync_tracker();
                    tracing::debug!(stream = %self.name, "stable: restart delays reset");
                }
                _ = check.tick(), if running && stall.is_some() => {
                    let stall = stall.unwrap_or(Duration::MAX);
                    let last = launch
                        .last_heartbeat
                        .lock()
                        .map_or(running_since, |t| t.max(running_since));
                    let silent_for = last.elapsed();
                    if silent_for >= stall {
                        self.transition(
                            ProducerState::Stopping,
                            &format!(
                                "no heartbeat line for {}: stopping to restart",
                                human(silent_for)
                            ),
                            Some(RestartReason::Stall),
                        );
                        let ended = self.stop_process(proc, StopMode::Graceful).await;
                        self.after_stop(proc.pid(), ended);
                        return if self.shutdown {
                            Outcome::Shutdown
                        } else if !self.stop_replies.is_empty() {
                            Outcome::Stopped
                        } else {
                            Outcome::Stalled { silent_for }
                        };
                    }
                }
            }
        }
    }
}
