//! The options of a [`Supervisor`] ([`SupervisorBuilder`]) and building one: validation,
//! metrics, orphans of an earlier instance, the `/proc` sampler.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use prometheus::Registry;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::broadcast;

use crate::error::{Error, Result};
use crate::producer::child::Marker;
use crate::producer::ledger::{self, Ledger};
use crate::producer::metrics::ProducerMetrics;
use crate::producer::orphans::{self, Instance, OrphanOptions, OrphanPolicy};
use crate::producer::spec::MAX_START_STOP;

use super::registry::{Shared, Supervisor};
use super::sampler::sample_loop;

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
    /// [`MAX_START_STOP`](crate::producer::MAX_START_STOP) (1 h).
    #[must_use]
    pub fn orphan_stop_timeout(mut self, d: Duration) -> Self {
        self.orphan_stop_timeout = d;
        self
    }

    /// How long a process may take to end and be reaped after SIGKILL before it is reported
    /// [unkillable](crate::producer::ProducerState::Unkillable) (stuck in the kernel, or held
    /// by a tracer) and the supervisor stops waiting for it. Default 5 s; 100 ms to
    /// [`MAX_KILL_TIMEOUT`] (10 min).
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

    /// Registers the producer metrics (`kvs_producer_*`, see the [module docs](crate::producer)) in
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
    /// [`InvalidConfig`](crate::ErrorKind::InvalidConfig) for an invalid option (naming it and its
    /// value) or an unusable state directory,
    /// [`AlreadyExists`](crate::ErrorKind::AlreadyExists) when the metrics are already registered.
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
