//! The [`Supervisor`]: one tokio task per producer, a `/proc` sampler, events and metrics.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use prometheus::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{broadcast, mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio::time::{Instant, sleep_until};

use crate::error::{Error, ErrorKind, Result};

use super::child::{
    self, AdoptedProc, LaunchSignals, LineRules, Marker, OutputBuffer, Proc, ProcHandle,
};
use super::health::assess;
use super::identity::{self, Check, Reach};
use super::ledger::{self, Ledger, LedgerEntry};
use super::metrics::ProducerMetrics;
use super::orphans::{
    self, Adoptable, Instance, OrphanAction, OrphanOptions, OrphanPolicy, deadline_after,
};
use super::procfs;
use super::restart::{Decision, RestartTracker};
use super::spec::{MAX_START_STOP, ProducerSpec, Rendered};
use super::status::{
    BulkFailure, BulkReport, ExitKind, LastExit, OutputLine, ProducerEvent, ProducerHealth,
    ProducerState, ProducerStatus, RestartReason, StopMode,
};

/// How long the output readers may take to drain the last lines after a process ended.
const READER_GRACE: Duration = Duration::from_secs(2);

/// The longest [`SupervisorBuilder::kill_timeout`]: 10 minutes.
pub const MAX_KILL_TIMEOUT: Duration = Duration::from_secs(600);

/// The most events a receiver may fall behind ([`SupervisorBuilder::event_capacity`]).
pub const MAX_EVENT_CAPACITY: usize = 1 << 20;

/// Options of a [`Supervisor`]; build it with [`SupervisorBuilder::build`].
#[derive(Clone, Debug)]
pub struct SupervisorBuilder {
    id: String,
    orphan_policy: OrphanPolicy,
    orphan_stop_timeout: Duration,
    kill_timeout: Duration,
    stats_interval: Duration,
    event_capacity: usize,
    registry: Option<Registry>,
    jitter_seed: Option<u64>,
    state_dir: Option<PathBuf>,
}

impl Default for SupervisorBuilder {
    fn default() -> Self {
        SupervisorBuilder {
            id: "kvs-frames".to_owned(),
            orphan_policy: OrphanPolicy::Kill,
            orphan_stop_timeout: Duration::from_secs(10),
            kill_timeout: Duration::from_secs(5),
            stats_interval: Duration::from_secs(2),
            event_capacity: 1024,
            registry: None,
            jitter_seed: None,
            state_dir: None,
        }
    }
}

impl SupervisorBuilder {
    /// The supervisor's id, written into every child's environment
    /// (`KVS_FRAMES_SUPERVISOR_ID`). A new instance with the same id finds the producers an
    /// earlier instance left behind. Keep it stable across restarts of your service and
    /// distinct between services on one host. 1–64 characters of `[a-zA-Z0-9_.-]`. Default
    /// `"kvs-frames"`.
    #[must_use]
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = id.into();
        self
    }

    /// What to do with orphans of an earlier instance. Default [`OrphanPolicy::Kill`].
    #[must_use]
    pub fn orphan_policy(mut self, policy: OrphanPolicy) -> Self {
        self.orphan_policy = policy;
        self
    }

    /// How long killed orphans (and unclaimed adoptable ones, at
    /// [`Supervisor::stop_all`]) get between SIGINT and SIGKILL. Default 10 s; at most
    /// [`MAX_START_STOP`](super::MAX_START_STOP) (1 h).
    #[must_use]
    pub fn orphan_stop_timeout(mut self, d: Duration) -> Self {
        self.orphan_stop_timeout = d;
        self
    }

    /// How long a process may take to end and be reaped after SIGKILL before it is reported
    /// [unkillable](ProducerState::Unkillable) (stuck in the kernel, or held by a tracer) and
    /// the supervisor stops waiting for it. Default 5 s; 100 ms to [`MAX_KILL_TIMEOUT`]
    /// (10 min).
    #[must_use]
    pub fn kill_timeout(mut self, d: Duration) -> Self {
        self.kill_timeout = d;
        self
    }

    /// How often CPU, memory and uptime are sampled from `/proc` (one scan for all
    /// producers). Default 2 s; 100 ms to 1 h.
    #[must_use]
    pub fn stats_interval(mut self, d: Duration) -> Self {
        self.stats_interval = d;
        self
    }

    /// How many events a slow [`Supervisor::events`] receiver may fall behind before it
    /// loses the oldest (it then gets `RecvError::Lagged`). Default 1024; 1 to
    /// [`MAX_EVENT_CAPACITY`].
    #[must_use]
    pub fn event_capacity(mut self, n: usize) -> Self {
        self.event_capacity = n;
        self
    }

    /// The directory of the ledgers: one small file per supervisor instance that records
    /// the processes it started, so that a later instance recognises its orphans by pid and
    /// start time rather than by their environment (which anyone can copy). It must belong
    /// to this user and be writable by it alone (it is created with mode 0700). Default:
    /// `$XDG_RUNTIME_DIR/kvs-frames`, else `/run/kvs-frames` for root, else
    /// `<temp dir>/kvs-frames-<uid>`. Supervisors that must find each other's orphans need
    /// the same directory.
    #[must_use]
    pub fn state_dir(mut self, dir: impl Into<PathBuf>) -> Self {
        self.state_dir = Some(dir.into());
        self
    }

    /// Registers the producer metrics (`kvs_producer_*`, see the [module docs](super)) in
    /// `registry`.
    #[must_use]
    pub fn metrics_registry(mut self, registry: &Registry) -> Self {
        self.registry = Some(registry.clone());
        self
    }

    /// Seeds the random source of the restart jitter (deterministic delays in tests).
    /// Default: seeded from the OS.
    #[must_use]
    pub fn jitter_seed(mut self, seed: u64) -> Self {
        self.jitter_seed = Some(seed);
        self
    }

    /// Validates the options, registers the metrics, handles the orphans of an earlier
    /// instance (see [`Supervisor::orphans`]) and starts the `/proc` sampler. Must run inside
    /// a tokio runtime (multi-threaded or current-thread); the supervisor's tasks run on it.
    /// The `/proc` scan for orphans runs on a blocking thread (at most 30 s); stopping them
    /// takes at most `orphan_stop_timeout` + `kill_timeout`.
    ///
    /// # Errors
    ///
    /// [`InvalidConfig`](ErrorKind::InvalidConfig) for an invalid option (naming it and its
    /// value) or an unusable state directory,
    /// [`AlreadyExists`](ErrorKind::AlreadyExists) when the metrics are already registered.
    pub async fn build(self) -> Result<Supervisor> {
        let id_ok = (1..=64).contains(&self.id.len())
            && self
                .id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
        if !id_ok {
            return Err(Error::invalid_config(
                "id",
                format!("{:?}", self.id),
                "must be 1-64 characters of [a-zA-Z0-9_.-]",
            ));
        }
        let ms100 = Duration::from_millis(100);
        if !(ms100..=Duration::from_secs(3600)).contains(&self.stats_interval) {
            return Err(Error::invalid_config(
                "stats_interval",
                format!("{:?}", self.stats_interval),
                "must be between 100 ms and 1 h",
            ));
        }
        if self.orphan_stop_timeout > MAX_START_STOP {
            return Err(Error::invalid_config(
                "orphan_stop_timeout",
                format!("{:?}", self.orphan_stop_timeout),
                "must be at most 1 h",
            ));
        }
        if !(ms100..=MAX_KILL_TIMEOUT).contains(&self.kill_timeout) {
            return Err(Error::invalid_config(
                "kill_timeout",
                format!("{:?}", self.kill_timeout),
                "must be between 100 ms and 10 min",
            ));
        }
        if !(1..=MAX_EVENT_CAPACITY).contains(&self.event_capacity) {
            return Err(Error::invalid_config(
                "event_capacity",
                self.event_capacity,
                "must be between 1 and 1048576",
            ));
        }
        let state_dir = self
            .state_dir
            .clone()
            .unwrap_or_else(ledger::default_state_dir);
        {
            let dir = state_dir.clone();
            let prepared = tokio::task::spawn_blocking(move || ledger::prepare_dir(&dir))
                .await
                .unwrap_or_else(|e| Err(e.to_string()));
            if let Err(why) = prepared {
                return Err(Error::invalid_config(
                    "state_dir",
                    state_dir.display(),
                    &format!("unusable as the supervisor's state directory: {why}"),
                ));
            }
        }
        let metrics = self
            .registry
            .as_ref()
            .map(ProducerMetrics::register)
            .transpose()?;
        let mut rng = match self.jitter_seed {
            Some(seed) => StdRng::seed_from_u64(seed),
            None => StdRng::from_os_rng(),
        };
        let nonce: u64 = rng.random();
        let own = Instance::current(nonce);
        let instance = own.marker();
        let ledger = Arc::new(Ledger::new(&state_dir, &self.id, &instance));
        orphans::register_instance(nonce);
        let (orphans, adoptable) = orphans::handle_orphans(&OrphanOptions {
            id: self.id.clone(),
            policy: self.orphan_policy,
            stop_timeout: self.orphan_stop_timeout,
            kill_timeout: self.kill_timeout,
            state_dir,
            ledger: ledger.clone(),
            own,
        })
        .await;
        let (events, _) = broadcast::channel(self.event_capacity);
        let shared = Arc::new(Shared {
            marker: Marker {
                id: self.id.clone(),
                instance,
            },
            nonce,
            producers: Mutex::new(BTreeMap::new()),
            events,
            metrics,
            rng: Arc::new(Mutex::new(rng)),
            orphans,
            adoptable: Arc::new(Mutex::new(adoptable)),
            sampler: Mutex::new(None),
            ledger,
            kill_timeout: self.kill_timeout,
            orphan_stop_timeout: self.orphan_stop_timeout,
        });
        // Spawned once the Arc exists: the sampler ends when it can no longer upgrade.
        *shared.sampler.lock() = Some(tokio::spawn(sample_loop(
            Arc::downgrade(&shared),
            self.stats_interval,
        )));
        tracing::info!(
            id = %self.id,
            orphans = shared.orphans.len(),
            "producer supervisor started"
        );
        Ok(Supervisor { shared })
    }
}

/// Keeps RTSP→KVS producer processes alive, observable and stoppable.
///
/// Each producer runs as a child process in its own process group, with its stdout and stderr
/// drained line by line. A producer is **Running** once it printed its readiness line or
/// lived `start_secs`; it is restarted after **any** exit nobody asked for (exit code 0
/// included) and when its heartbeat line has not come for `stall_timeout`, after a jittered
/// exponential delay; too many failed starts in a window make it **Fatal**. Stopping sends
/// SIGINT to the group, then SIGKILL after `stop_timeout`; a process still there after the
/// kill timeout is reported **Unkillable** and left behind. See the [module docs](super) for
/// the whole story.
///
/// Only processes this supervisor started (or adopted) are ever signalled, each after its
/// identity (pid, start time, boot) was checked again just before.
///
/// `Supervisor` is a cheap handle (`Clone`). When the last handle is dropped, every producer's
/// process group gets SIGKILL at once and the children are reaped by their tasks: call
/// [`stop_all`](Supervisor::stop_all) first for a graceful stop.
#[derive(Clone)]
pub struct Supervisor {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Supervisor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Supervisor")
            .field("id", &self.shared.marker.id)
            .field("producers", &self.shared.producers.lock().len())
            .finish_non_exhaustive()
    }
}

struct Shared {
    marker: Marker,
    nonce: u64,
    producers: Mutex<BTreeMap<String, Entry>>,
    events: broadcast::Sender<ProducerEvent>,
    metrics: Option<ProducerMetrics>,
    rng: Arc<Mutex<StdRng>>,
    orphans: Vec<OrphanAction>,
    adoptable: Arc<Mutex<HashMap<String, Adoptable>>>,
    sampler: Mutex<Option<JoinHandle<()>>>,
    ledger: Arc<Ledger>,
    kill_timeout: Duration,
    orphan_stop_timeout: Duration,
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

struct Entry {
    producer: Arc<ProducerShared>,
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

enum Command {
    Stop {
        mode: StopMode,
        reply: oneshot::Sender<()>,
    },
    Restart {
        reply: oneshot::Sender<Result<()>>,
    },
    Shutdown,
}

/// The state of one producer shared between its runner, the sampler and the API.
pub(crate) struct ProducerShared {
    name: String,
    pub(crate) status: Mutex<StatusInner>,
    output: Arc<Mutex<OutputBuffer>>,
    /// The current process (its pid is its process group), while it may be signalled.
    process: Mutex<Option<Arc<ProcHandle>>>,
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
    fn snapshot(&self) -> ProducerStatus {
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

    fn health(&self) -> ProducerHealth {
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

fn new_status(spec: &ProducerSpec, rendered: &Rendered) -> StatusInner {
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

fn apply_spec(s: &mut StatusInner, spec: &ProducerSpec, rendered: &Rendered) {
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

fn count_restart(s: &mut StatusInner, reason: RestartReason) {
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

fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} s", d.as_secs())
    }
}

/// How the supervision of one process ended.
enum Outcome {
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

/// How a stop ended.
enum Ended {
    /// Ended and reaped.
    Exit(ExitKind),
    /// Not gone (or not reaped) within the kill timeout after SIGKILL: why.
    Unkillable(String),
}

struct Runner {
    name: String,
    spec: ProducerSpec,
    rendered: Rendered,
    producer: Arc<ProducerShared>,
    events: broadcast::Sender<ProducerEvent>,
    metrics: Option<ProducerMetrics>,
    rng: Arc<Mutex<StdRng>>,
    marker: Marker,
    adoptable: Arc<Mutex<HashMap<String, Adoptable>>>,
    ledger: Arc<Ledger>,
    kill_timeout: Duration,
    tracker: RestartTracker,
    cmds: mpsc::UnboundedReceiver<Command>,
    /// Callers waiting for the next launch (start, restart).
    pending_starts: Vec<oneshot::Sender<Result<()>>>,
    /// Callers waiting for the stop to complete.
    stop_replies: Vec<oneshot::Sender<()>>,
    shutdown: bool,
    /// Whether a process was launched (a failed first launch is the caller's error).
    launched_once: bool,
    /// The current process was found unkillable: it goes to the late reaper.
    unkillable: bool,
}

impl Runner {
    fn transition(&self, to: ProducerState, reason: &str, restart_reason: Option<RestartReason>) {
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

    fn record_exit(&self, pid: u32, kind: ExitKind, requested: bool) {
        self.producer.status.lock().last_exit = Some(LastExit {
            kind,
            at: SystemTime::now(),
            requested,
            pid,
        });
    }

    /// Reports the current process unkillable (state and event); it is handed to the late
    /// reaper once its supervision ends.
    fn mark_unkillable(&mut self, pid: u32, why: &str) {
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
    fn after_stop(&mut self, pid: u32, ended: Ended) {
        match ended {
            Ended::Exit(kind) => self.record_exit(pid, kind, true),
            Ended::Unkillable(why) => self.mark_unkillable(pid, &why),
        }
    }

    /// Keeps trying to reap an unkillable process, once a second, while the producer exists.
    fn hand_to_late_reaper(&self, mut proc: Proc) {
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

    async fn run(mut self) {
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

    fn sync_tracker(&self) {
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

    /// Watches one process until it ends or is stopped.
    async fn supervise(&mut self, proc: &mut Proc, launch: &Arc<LaunchSignals>) -> Outcome {
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

    /// Stops the process group: SIGINT, SIGKILL after `stop_timeout` (at once for
    /// [`StopMode::Force`]), then waits at most `kill_timeout` for it to end and again at
    /// most `kill_timeout` to reap it, and drains its last lines. Stop commands that arrive
    /// meanwhile join (a forced one escalates); a restart is refused. Every signal re-checks
    /// the process's identity first.
    async fn stop_process(&mut self, proc: &mut Proc, mode: StopMode) -> Ended {
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

/// Samples CPU, memory and uptime of every producer from one `/proc` scan per interval, and
/// forgets orphans kept for adoption that are gone.
async fn sample_loop(shared: Weak<Shared>, interval: Duration) {
    struct Prev {
        pgid: i32,
        at: Instant,
        ticks: HashMap<i32, u64>,
    }
    let mut previous: HashMap<String, Prev> = HashMap::new();
    let mut tick = tokio::time::interval(interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let ticks_per_sec = procfs::clock_ticks_per_second() as f64;
    loop {
        tick.tick().await;
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let producers: Vec<(String, Arc<ProducerShared>, i32)> = shared
            .producers
            .lock()
            .iter()
            .map(|(n, e)| {
                let pgid = e
                    .producer
                    .process
                    .lock()
                    .as_ref()
                    .map_or(0, |h| h.identity.pid);
                (n.clone(), e.producer.clone(), pgid)
            })
            .collect();
        let metrics = shared.metrics.clone();
        let orphans: Vec<(String, identity::Identity)> = shared
            .adoptable
            .lock()
            .iter()
            .map(|(n, a)| (n.clone(), a.identity.clone()))
            .collect();
        let weak = Arc::downgrade(&shared);
        drop(shared);
        let pgids: Vec<i32> = producers
            .iter()
            .map(|(_, _, g)| *g)
            .filter(|&g| g > 0)
            .collect();
        let (samples, gone) = tokio::task::spawn_blocking(move || {
            let gone: Vec<(String, identity::Identity)> = orphans
                .into_iter()
                .filter(|(_, id)| id.check() != Check::Alive)
                .collect();
            (procfs::sample_groups(&pgids), gone)
        })
        .await
        .unwrap_or_default();
        if !gone.is_empty()
            && let Some(shared) = weak.upgrade()
        {
            let mut adoptable = shared.adoptable.lock();
            for (name, id) in gone {
                if adoptable.get(&name).is_some_and(|a| a.identity == id) {
                    adoptable.remove(&name);
                    shared.ledger.remove(id.pid, id.start_ticks);
                    tracing::info!(stream = %name, pid = id.pid, "an orphan kept for adoption ended: forgotten");
                }
            }
        }
        let now = Instant::now();
        for (name, producer, pgid) in &producers {
            let pgid = *pgid;
            let sample = samples.get(&pgid).filter(|_| pgid > 0);
            let (cpu, rss) = match sample {
                Some(sample) => {
                    let cpu = match previous.get(name) {
                        Some(prev) if prev.pgid == pgid => {
                            let secs = now.duration_since(prev.at).as_secs_f64();
                            let delta = procfs::cpu_delta_ticks(&prev.ticks, &sample.ticks);
                            (secs > 0.0).then(|| delta as f64 / ticks_per_sec / secs * 100.0)
                        }
                        _ => None,
                    };
                    previous.insert(
                        name.clone(),
                        Prev {
                            pgid,
                            at: now,
                            ticks: sample.ticks.clone(),
                        },
                    );
                    (cpu, Some(sample.rss_bytes))
                }
                None => {
                    previous.remove(name);
                    (None, None)
                }
            };
            // Lock order: never hold `output` and `status` together.
            let heartbeat = producer.output.lock().last_heartbeat;
            let (uptime, cpu, rss) = {
                let mut s = producer.status.lock();
                if s.pid.is_some() {
                    if cpu.is_some() {
                        s.cpu_percent = cpu;
                    }
                    s.rss_bytes = rss;
                } else {
                    s.cpu_percent = None;
                    s.rss_bytes = None;
                }
                (
                    s.started_instant
                        .map_or(0.0, |t| now.duration_since(t).as_secs_f64()),
                    s.cpu_percent,
                    s.rss_bytes,
                )
            };
            if let Some(m) = &metrics {
                m.set_process(name, uptime, cpu, rss);
                if let Some(hb) =
                    heartbeat.and_then(|t| t.duration_since(SystemTime::UNIX_EPOCH).ok())
                {
                    m.set_heartbeat(name, hb.as_secs_f64());
                }
            }
        }
        previous.retain(|name, _| producers.iter().any(|(n, _, _)| n == name));
    }
}
