//! The [`Supervisor`] handle: its registry of producers (one runner task each) and its public
//! API (start, stop, restart, remove, bulk operations, status, health, output, waits).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use rand::rngs::StdRng;
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::Instant;

use crate::error::{Error, ErrorKind, Result};
use crate::producer::child::{Marker, OutputBuffer};
use crate::producer::identity::{self, Reach};
use crate::producer::ledger::Ledger;
use crate::producer::metrics::ProducerMetrics;
use crate::producer::orphans::{self, Adoptable, OrphanAction, deadline_after};
use crate::producer::restart::RestartTracker;
use crate::producer::spec::ProducerSpec;
use crate::producer::status::{
    BulkFailure, BulkReport, OutputLine, ProducerEvent, ProducerHealth, ProducerState,
    ProducerStatus, RestartReason, StopMode,
};

use super::builder::SupervisorBuilder;
use super::runner::{Command, Runner};
use super::state::{ProducerShared, apply_spec, count_restart, new_status};

/// Keeps RTSP→KVS producer processes alive, observable and stoppable.
///
/// Each producer runs as a child process in its own process group, with its stdout and stderr
/// drained line by line. A producer is **Running** once it printed its readiness line or
/// lived `start_secs`; it is restarted after **any** exit nobody asked for (exit code 0
/// included) and when its heartbeat line has not come for `stall_timeout`, after a jittered
/// exponential delay; too many failed starts in a window make it **Fatal**. Stopping sends
/// SIGINT to the group, then SIGKILL after `stop_timeout`; a process still there after the
/// kill timeout is reported **Unkillable** and left behind. See the
/// [module docs](crate::producer) for the whole story.
///
/// Only processes this supervisor started (or adopted) are ever signalled, each after its
/// identity (pid, start time, boot) was checked again just before.
///
/// `Supervisor` is a cheap handle (`Clone`). When the last handle is dropped, every producer's
/// process group gets SIGKILL at once and the children are reaped by their tasks: call
/// [`stop_all`](Supervisor::stop_all) first for a graceful stop.
#[derive(Clone)]
pub struct Supervisor {
    pub(super) shared: Arc<Shared>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("id", &self.shared.marker.id)
            .field("producers", &self.shared.producers.lock().len())
            .finish_non_exhaustive()
    }
}

pub(super) struct Shared {
    pub(super) marker: Marker,
    pub(super) nonce: u64,
    pub(super) producers: Mutex<BTreeMap<String, Entry>>,
    pub(super) events: broadcast::Sender<ProducerEvent>,
    pub(super) metrics: Option<ProducerMetrics>,
    pub(super) rng: Arc<Mutex<StdRng>>,
    pub(super) orphans: Vec<OrphanAction>,
    pub(super) adoptable: Arc<Mutex<HashMap<String, Adoptable>>>,
    pub(super) sampler: Mutex<Option<JoinHandle<()>>>,
    pub(super) ledger: Arc<Ledger>,
    pub(super) kill_timeout: Duration,
    pub(super) orphan_stop_timeout: Duration,
}

impl Drop for Shared {
    fn drop(&mut self) {
        if let Some(sampler) = self.sampler.lock().take() {
            sampler.abort();
        }
        let producers = std::mem::take(&mut *self.producers.lock());
        for entry in producers.values() {
            let process = entry.producer.process.lock().clone();
            if let Some(process) = process {
                // Identity re-checked; a reaped child is never signalled.
                let _ = process.signal_group(libc::SIGKILL);
            }
            if let Some(runner) = &entry.runner {
                // The runner reaps its child (and kills it, if it spawned one meanwhile).
                let _ = runner.tx.send(Command::Shutdown);
            }
        }
        for orphan in self.adoptable.lock().drain().map(|(_, a)| a) {
            let _ = identity::signal(&orphan.identity, Reach::Group, libc::SIGKILL);
            self.ledger
                .remove(orphan.identity.pid, orphan.identity.start_ticks);
        }
        orphans::unregister_instance(self.nonce);
    }
}

pub(super) struct Entry {
    pub(super) producer: Arc<ProducerShared>,
    runner: Option<RunnerHandle>,
}

struct RunnerHandle {
    tx: mpsc::UnboundedSender<Command>,
    task: JoinHandle<()>,
}

impl Entry {
    fn is_active(&self) -> bool {
        self.runner.as_ref().is_some_and(|r| !r.task.is_finished())
            && self.producer.status.lock().state.is_active()
    }
}

impl Supervisor {
    /// The options, with their defaults.
    #[must_use]
    pub fn builder() -> SupervisorBuilder {
        SupervisorBuilder::default()
    }

    /// What was done with the producers of an earlier instance when this one was built.
    #[must_use]
    pub fn orphans(&self) -> &[OrphanAction] {
        &self.shared.orphans
    }

    /// The supervisor's id.
    #[must_use]
    pub fn id(&self) -> &str {
        &self.shared.marker.id
    }

    /// State changes of every producer, with their reasons. Each call gives a new receiver
    /// that sees the events from now on.
    #[must_use]
    pub fn events(&self) -> broadcast::Receiver<ProducerEvent> {
        self.shared.events.subscribe()
    }

    /// Validates `spec` and starts its producer; returns once the process is spawned (state
    /// Starting), or adopted (Running) when an orphan of this stream was kept for adoption.
    ///
    /// A stopped or Fatal producer of the same name is replaced (its restart counters and
    /// output lines are kept).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) for an invalid spec, including a missing
    /// or non-executable binary; [`AlreadyExists`](ErrorKind::AlreadyExists) when a producer
    /// of that name is active; [`Io`](ErrorKind::Io) when the process cannot be spawned.
    pub async fn start(&self, spec: ProducerSpec) -> Result<ProducerStatus> {
        let name = spec.stream_name.clone();
        let rendered = spec
            .render()
            .map_err(|e| e.context(format!("producer {name}")))?;
        for warning in &rendered.warnings {
            tracing::warn!(stream = %name, "{}", rendered.secrets.redact(warning));
        }
        let (started_tx, started_rx) = oneshot::channel();
        {
            let mut producers = self.shared.producers.lock();
            if let Some(entry) = producers.get(&name)
                && entry.is_active()
            {
                return Err(Error::new(
                    ErrorKind::AlreadyExists,
                    format!(
                        "producer {name} is already {}",
                        entry.producer.status.lock().state
                    ),
                ));
            }
            let producer = match producers.get(&name) {
                Some(entry) => {
                    let producer = entry.producer.clone();
                    {
                        let mut out = producer.output.lock();
                        out.capacity = spec.output_lines;
                    }
                    {
                        let mut s = producer.status.lock();
                        apply_spec(&mut s, &spec, &rendered);
                        s.last_supervisor_error = None;
                    }
                    producer
                }
                None => {
                    let mut s = new_status(&spec, &rendered);
                    s.state_reason = "added".to_owned();
                    if let Some(m) = &self.shared.metrics {
                        m.add(&name);
                        m.set_state(&name, ProducerState::Stopped);
                    }
                    Arc::new(ProducerShared {
                        name: name.clone(),
                        status: Mutex::new(s),
                        output: Arc::new(Mutex::new(OutputBuffer::new(spec.output_lines))),
                        process: Mutex::new(None),
                    })
                }
            };
            {
                let heartbeats = producer.output.lock().heartbeats_seen;
                producer.status.lock().heartbeats_at_activation = heartbeats;
            }
            let (tx, rx) = mpsc::unbounded_channel();
            let runner = Runner {
                name: name.clone(),
                tracker: RestartTracker::new(spec.restart.clone()),
                spec,
                rendered,
                producer: producer.clone(),
                events: self.shared.events.clone(),
                metrics: self.shared.metrics.clone(),
                rng: self.shared.rng.clone(),
                marker: self.shared.marker.clone(),
                adoptable: self.shared.adoptable.clone(),
                ledger: self.shared.ledger.clone(),
                kill_timeout: self.shared.kill_timeout,
                cmds: rx,
                pending_starts: vec![started_tx],
                stop_replies: Vec::new(),
                shutdown: false,
                launched_once: false,
                unkillable: false,
            };
            let task = tokio::spawn(runner.run());
            producers.insert(
                name.clone(),
                Entry {
                    producer,
                    runner: Some(RunnerHandle { tx, task }),
                },
            );
        }
        match started_rx.await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => {
                return Err(Error::new(
                    ErrorKind::Stopped,
                    format!("producer {name}: the supervisor shut down while starting"),
                ));
            }
        }
        self.status(&name)
            .ok_or_else(|| Error::new(ErrorKind::Internal, format!("producer {name} vanished")))
    }

    fn not_found(name: &str) -> Error {
        Error::invalid_config(
            "stream_name",
            format!("{name:?}"),
            "no producer with this name",
        )
    }

    /// Stops a producer: [`StopMode::Graceful`] sends SIGINT to its process group and SIGKILL
    /// after its `stop_timeout`; [`StopMode::Force`] sends SIGKILL at once (and escalates a
    /// graceful stop in progress). Returns once the process is gone and reaped, with the final
    /// status (Stopped) — or, when it survives SIGKILL or cannot be reaped for the kill
    /// timeout, with state [`Unkillable`](ProducerState::Unkillable): always within
    /// `stop_timeout` + 2 × `kill_timeout` + 2 s. Stopping a stopped, Fatal or Unkillable
    /// producer does nothing.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) when there is no producer of that name.
    pub async fn stop(&self, stream_name: &str, mode: StopMode) -> Result<ProducerStatus> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = {
            let producers = self.shared.producers.lock();
            let entry = producers
                .get(stream_name)
                .ok_or_else(|| Self::not_found(stream_name))?;
            entry.runner.as_ref().is_some_and(|r| {
                r.tx.send(Command::Stop {
                    mode,
                    reply: reply_tx,
                })
                .is_ok()
            })
        };
        if sent {
            // An error means the runner ended meanwhile (Fatal, or dropped): stopped anyway.
            let _ = reply_rx.await;
        }
        self.status(stream_name)
            .ok_or_else(|| Self::not_found(stream_name))
    }

    /// Restarts a producer now: a graceful stop and a new process, without delay, counted as a
    /// [`RestartReason::Manual`] restart; the backoff and the start-limit window are reset (a
    /// Fatal or stopped producer is started again).
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) when there is no producer of that name;
    /// the spawn error when the new process cannot be started.
    pub async fn restart(&self, stream_name: &str) -> Result<ProducerStatus> {
        let (reply_tx, reply_rx) = oneshot::channel();
        let sent = {
            let producers = self.shared.producers.lock();
            let entry = producers
                .get(stream_name)
                .ok_or_else(|| Self::not_found(stream_name))?;
            entry.is_active()
                && entry
                    .runner
                    .as_ref()
                    .is_some_and(|r| r.tx.send(Command::Restart { reply: reply_tx }).is_ok())
        };
        if sent {
            match reply_rx.await {
                Ok(result) => result?,
                Err(_) => {
                    return Err(Error::new(
                        ErrorKind::Stopped,
                        format!("producer {stream_name} ended while restarting"),
                    ));
                }
            }
            return self
                .status(stream_name)
                .ok_or_else(|| Self::not_found(stream_name));
        }
        // Not active: start it again with its spec.
        let spec = self.spec_of(stream_name)?;
        {
            let producers = self.shared.producers.lock();
            if let Some(entry) = producers.get(stream_name) {
                let mut s = entry.producer.status.lock();
                count_restart(&mut s, RestartReason::Manual);
                if let Some(m) = &self.shared.metrics {
                    m.restart(stream_name, RestartReason::Manual);
                }
            }
        }
        self.start(spec).await
    }

    fn spec_of(&self, stream_name: &str) -> Result<ProducerSpec> {
        let producers = self.shared.producers.lock();
        let entry = producers
            .get(stream_name)
            .ok_or_else(|| Self::not_found(stream_name))?;
        let spec = entry.producer.status.lock().spec.clone();
        spec.ok_or_else(|| Self::not_found(stream_name))
    }

    /// Stops a producer (see [`stop`](Supervisor::stop)) and forgets it: its status, output
    /// and metric series are removed.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) when there is no producer of that name.
    pub async fn remove(&self, stream_name: &str, mode: StopMode) -> Result<()> {
        self.stop(stream_name, mode).await?;
        let entry = self.shared.producers.lock().remove(stream_name);
        if let Some(entry) = entry
            && let Some(runner) = entry.runner
        {
            let _ = runner.tx.send(Command::Shutdown);
        }
        if let Some(m) = &self.shared.metrics {
            m.remove(stream_name);
        }
        Ok(())
    }

    /// Starts every spec, concurrently; one result per item.
    pub async fn start_all(&self, specs: impl IntoIterator<Item = ProducerSpec>) -> BulkReport {
        let specs: Vec<ProducerSpec> = specs.into_iter().collect();
        let names: Vec<String> = specs.iter().map(|s| s.stream_name.clone()).collect();
        let results =
            futures_util::future::join_all(specs.into_iter().map(|spec| self.start(spec))).await;
        collect_report(names, results.into_iter().map(|r| r.map(|_| ())))
    }

    /// Stops every producer, concurrently (a graceful stop of many kvssink producers takes as
    /// long as the slowest one, not the sum), and the orphans kept for adoption that were
    /// never claimed (SIGINT, SIGKILL after `orphan_stop_timeout`, each after their identity
    /// was checked again); one result per item. A producer that ends
    /// [Unkillable](ProducerState::Unkillable) and an orphan that survives SIGKILL are
    /// failures.
    pub async fn stop_all(&self, mode: StopMode) -> BulkReport {
        let names: Vec<String> = self.shared.producers.lock().keys().cloned().collect();
        let results =
            futures_util::future::join_all(names.iter().map(|n| self.stop(n, mode))).await;
        let mut report = collect_report(
            names,
            results.into_iter().map(|r| {
                r.and_then(|status| {
                    if status.state == ProducerState::Unkillable {
                        Err(Error::new(ErrorKind::Timeout, status.state_reason))
                    } else {
                        Ok(())
                    }
                })
            }),
        );
        let unclaimed: Vec<(String, Adoptable)> = self.shared.adoptable.lock().drain().collect();
        let list: Vec<Adoptable> = unclaimed.iter().map(|(_, a)| a.clone()).collect();
        let outcomes = orphans::stop_unclaimed(
            &list,
            self.shared.orphan_stop_timeout,
            self.shared.kill_timeout,
        )
        .await;
        for ((name, orphan), outcome) in unclaimed.into_iter().zip(outcomes) {
            let label = format!("{name} (unclaimed orphan pid {})", orphan.identity.pid);
            match outcome {
                orphans::OrphanOutcome::Failed(why) => report.failed.push(BulkFailure {
                    stream_name: label,
                    error: Error::new(ErrorKind::Timeout, why),
                }),
                _ => {
                    self.shared
                        .ledger
                        .remove(orphan.identity.pid, orphan.identity.start_ticks);
                    report.succeeded.push(label);
                }
            }
        }
        report
    }

    /// A snapshot of one producer.
    #[must_use]
    pub fn status(&self, stream_name: &str) -> Option<ProducerStatus> {
        let producer = self
            .shared
            .producers
            .lock()
            .get(stream_name)
            .map(|e| e.producer.clone())?;
        Some(producer.snapshot())
    }

    /// Snapshots of every producer, by stream name.
    #[must_use]
    pub fn list(&self) -> Vec<ProducerStatus> {
        let producers: Vec<Arc<ProducerShared>> = self
            .shared
            .producers
            .lock()
            .values()
            .map(|e| e.producer.clone())
            .collect();
        producers.iter().map(|p| p.snapshot()).collect()
    }

    /// What is wrong with a producer and what to try.
    #[must_use]
    pub fn health(&self, stream_name: &str) -> Option<ProducerHealth> {
        let producer = self
            .shared
            .producers
            .lock()
            .get(stream_name)
            .map(|e| e.producer.clone())?;
        Some(producer.health())
    }

    /// The latest output lines of a producer (stdout and stderr, across its restarts, oldest
    /// first, redacted).
    #[must_use]
    pub fn output(&self, stream_name: &str) -> Option<Vec<OutputLine>> {
        let producer = self
            .shared
            .producers
            .lock()
            .get(stream_name)
            .map(|e| e.producer.clone())?;
        let lines = producer.output.lock().lines.iter().cloned().collect();
        Some(lines)
    }

    /// Waits until `predicate` holds for the producer's status, checking every 20 ms.
    ///
    /// # Errors
    ///
    /// [`Timeout`](ErrorKind::Timeout) after `timeout`, with the last status in the message;
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) when there is no producer of that name.
    pub async fn wait_until(
        &self,
        stream_name: &str,
        timeout: Duration,
        predicate: impl Fn(&ProducerStatus) -> bool,
    ) -> Result<ProducerStatus> {
        let deadline = deadline_after(timeout);
        loop {
            let status = self
                .status(stream_name)
                .ok_or_else(|| Self::not_found(stream_name))?;
            if predicate(&status) {
                return Ok(status);
            }
            if Instant::now() >= deadline {
                return Err(Error::new(
                    ErrorKind::Timeout,
                    format!(
                        "producer {stream_name}: condition not met within {timeout:?}; state {} \
                         ({}), last error: {}",
                        status.state,
                        status.state_reason,
                        status.last_error.as_deref().unwrap_or("none")
                    ),
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the producer is in `state`. See [`wait_until`](Supervisor::wait_until).
    ///
    /// # Errors
    ///
    /// As [`wait_until`](Supervisor::wait_until).
    pub async fn wait_for_state(
        &self,
        stream_name: &str,
        state: ProducerState,
        timeout: Duration,
    ) -> Result<ProducerStatus> {
        self.wait_until(stream_name, timeout, |s| s.state == state)
            .await
    }
}

fn collect_report(names: Vec<String>, results: impl Iterator<Item = Result<()>>) -> BulkReport {
    let mut report = BulkReport::default();
    for (name, result) in names.into_iter().zip(results) {
        match result {
            Ok(()) => report.succeeded.push(name),
            Err(error) => report.failed.push(BulkFailure {
                stream_name: name,
                error,
            }),
        }
    }
    report
}
