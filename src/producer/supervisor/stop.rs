//! Stopping one process group with bounded waits (SIGINT, SIGKILL after `stop_timeout`, the
//! kill timeout), and processes found unkillable (reported, then reaped late).

use std::sync::Arc;
use std::time::Duration;

use tokio::time::sleep_until;

use crate::error::{Error, ErrorKind};
use crate::producer::child::Proc;
use crate::producer::orphans::deadline_after;
use crate::producer::procfs;
use crate::producer::status::{ExitKind, ProducerState, StopMode};

use super::runner::{Command, Runner};
use super::{READER_GRACE, human};

/// How a stop ended.
pub(super) enum Ended {
    /// Ended and reaped.
    Exit(ExitKind),
    /// Not gone (or not reaped) within the kill timeout after SIGKILL: why.
    Unkillable(String),
}

impl Runner {
    /// Reports the current process unkillable (state and event); it is handed to the late
    /// reaper once its supervision ends.
    pub(super) fn mark_unkillable(&mut self, pid: u32, why: &str) {
        self.unkillable = true;
        {
            let mut s = self.producer.status.lock();
            if !s.unkillable.contains(&pid) {
                s.unkillable.push(pid);
            }
        }
        let tracer = i32::try_from(pid)
            .ok()
            .and_then(procfs::tracer_pid)
            .map_or(String::new(), |t| format!(" (traced by pid {t})"));
        self.transition(
            ProducerState::Unkillable,
            &format!(
                "pid {pid} {why}{tracer}: stuck in the kernel or held by a tracer; no longer \
                 waited for (reaped when it ends)"
            ),
            None,
        );
    }

    /// Records the outcome of a stop: the exit, or the unkillable process.
    pub(super) fn after_stop(&mut self, pid: u32, ended: Ended) {
        match ended {
            Ended::Exit(kind) => self.record_exit(pid, kind, true),
            Ended::Unkillable(why) => self.mark_unkillable(pid, &why),
        }
    }

    /// Keeps trying to reap an unkillable process, once a second, while the producer exists.
    pub(super) fn hand_to_late_reaper(&self, mut proc: Proc) {
        let producer = Arc::downgrade(&self.producer);
        let ledger = self.ledger.clone();
        let name = self.name.clone();
        tokio::spawn(async move {
            let pid = proc.pid();
            let identity = proc.handle().identity.clone();
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let Some(producer) = producer.upgrade() else {
                    // The supervisor is gone: dropping `proc` kills and reaps it in a thread.
                    return;
                };
                if let Some(kind) = proc.try_reap() {
                    producer.status.lock().unkillable.retain(|p| *p != pid);
                    ledger.remove(identity.pid, identity.start_ticks);
                    tracing::info!(stream = %name, pid, %kind, "the unkillable process ended and was reaped");
                    return;
                }
            }
        });
    }

    /// Stops the process group: SIGINT, SIGKILL after `stop_timeout` (at once for
    /// [`StopMode::Force`]), then waits at most `kill_timeout` for it to end and again at
    /// most `kill_timeout` to reap it, and drains its last lines. Stop commands that arrive
    /// meanwhile join (a forced one escalates); a restart is refused. Every signal re-checks
    /// the process's identity first.
    pub(super) async fn stop_process(&mut self, proc: &mut Proc, mode: StopMode) -> Ended {
        let mut killed = mode == StopMode::Force;
        proc.signal_group(if killed { libc::SIGKILL } else { libc::SIGINT });
        let graceful_deadline = deadline_after(self.spec.stop_timeout);
        let mut kill_deadline = killed.then(|| deadline_after(self.kill_timeout));
        loop {
            tokio::select! {
                () = proc.exited() => break,
                () = sleep_until(graceful_deadline), if !killed => {
                    tracing::warn!(
                        stream = %self.name,
                        pid = proc.pid(),
                        "still running {} after SIGINT: SIGKILL",
                        human(self.spec.stop_timeout)
                    );
                    proc.signal_group(libc::SIGKILL);
                    killed = true;
                    kill_deadline = Some(deadline_after(self.kill_timeout));
                }
                () = sleep_until(kill_deadline.unwrap_or(graceful_deadline)), if kill_deadline.is_some() => {
                    proc.finish_readers(Duration::ZERO).await;
                    return Ended::Unkillable(format!(
                        "still running {} after SIGKILL",
                        human(self.kill_timeout)
                    ));
                }
                cmd = self.cmds.recv(), if !self.shutdown => match cmd {
                    Some(Command::Stop { mode, reply }) => {
                        self.stop_replies.push(reply);
                        if mode == StopMode::Force && !killed {
                            proc.signal_group(libc::SIGKILL);
                            killed = true;
                            kill_deadline = Some(deadline_after(self.kill_timeout));
                        }
                    }
                    Some(Command::Restart { reply }) => {
                        let _ = reply.send(Err(Error::new(
                            ErrorKind::Stopped,
                            format!("producer {} is stopping", self.name),
                        )));
                    }
                    Some(Command::Shutdown) | None => {
                        self.shutdown = true;
                        if !killed {
                            proc.signal_group(libc::SIGKILL);
                            killed = true;
                            kill_deadline = Some(deadline_after(self.kill_timeout));
                        }
                    }
                }
            }
        }
        // The leader ended but is not reaped: its group id is still its own.
        proc.signal_group(libc::SIGKILL);
        let reaped = proc.reap_until(deadline_after(self.kill_timeout)).await;
        proc.finish_readers(READER_GRACE).await;
        match reaped {
            Some(exit) => {
                tracing::debug!(stream = %self.name, pid = proc.pid(), %exit, "process ended");
                Ended::Exit(exit)
            }
            None => Ended::Unkillable(format!(
                "ended but could not be reaped within {}",
                human(self.kill_timeout)
            )),
        }
    }
}
