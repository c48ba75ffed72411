//! RTSP→KVS producer supervision: keep the processes that push cameras into Kinesis Video
//! Streams alive, observable and stoppable.
//!
//! A [`Supervisor`] (tokio) owns many producers. Each [`ProducerSpec`] names a stream, a camera
//! URL (a secret: shown as `rtsp://user:***@host…` everywhere) and a [`ProducerCommand`]:
//! [`KvsGstreamerSample`] (`kvs_gstreamer_sample <stream> <rtsp-url>`), [`GstLaunchKvssink`]
//! (`gst-launch-1.0 -e rtspsrc … ! kvssink …`) or a [`CustomCommand`].
//!
//! # How a producer is supervised
//!
//! * **Process.** Each producer is a child in its own process group (signals reach the whole
//!   pipeline), with stdin closed and stdout/stderr drained concurrently line by line, so a
//!   full pipe never blocks it; the last N lines are kept ([`Supervisor::output`]). Its
//!   environment carries a marker (`KVS_FRAMES_SUPERVISOR_ID`, `…_INSTANCE`, `KVS_FRAMES_PRODUCER`)
//!   that lets a later supervisor find it if this one dies.
//! * **States** ([`ProducerState`], after supervisord): Stopped → Starting → Running, Backoff
//!   between restarts, Stopping, Fatal, Unkillable. A producer is Running once it printed its
//!   readiness line or lived `start_secs`.
//! * **Restarts** on *any* exit nobody asked for (exit 0 included: `kvs_gstreamer_sample`
//!   exits 0 after RTSP errors) and when the heartbeat line (`Reporting fragment ack
//!   received` by default) has not come for `stall_timeout`, after a jittered exponential
//!   delay with a cap, reset once the producer has run for a stable period
//!   ([`RestartPolicy`]). Too many *failed starts* (ends before Running) within a window make
//!   it Fatal ([`StartLimit`]), with the last error in its status.
//! * **Stop**: SIGINT to the group, SIGKILL after `stop_timeout`; [`StopMode::Force`] kills at
//!   once. Every wait is bounded: a process still there `kill_timeout` after SIGKILL (stuck in
//!   the kernel, held by a tracer) is reported [`ProducerState::Unkillable`] and left behind.
//!   Children are reaped (after the last signal to their group). Dropping the last
//!   [`Supervisor`] handle SIGKILLs every group.
//! * **Only its own processes are signalled**, each after its identity (pid, start time, boot)
//!   was read again from `/proc` just before; a reaped child never is.
//! * **Durations** are checked at build/start against documented maxima ([`MAX_START_STOP`],
//!   [`MAX_PERIOD`], [`MAX_KILL_TIMEOUT`]): `Duration::MAX` is an error naming the option, never
//!   a panic.
//! * **Status** ([`ProducerStatus`]): state and reason, pid, start time, uptime, restarts by
//!   reason, last exit (code or signal), last error line, last heartbeat, CPU percent and
//!   resident memory of the process group from `/proc`. [`Supervisor::health`] turns it into
//!   issues and recommendations; [`Supervisor::events`] streams the state changes.
//! * **Orphans** of an earlier instance with the same id are found through `/proc` at
//!   [`SupervisorBuilder::build`] (on a blocking thread), proven its own by the dead
//!   instance's ledger (pid and start time of every process it started, in the
//!   [state directory](SupervisorBuilder::state_dir)) and a marker of this boot and PID
//!   namespace, and stopped, adopted or ignored ([`OrphanPolicy`]); anything else carrying the
//!   marker — a copy of a producer's command line and environment, a container's producers —
//!   is left alone. See [`Supervisor::orphans`].
//! * **Secrets**: the camera URL's password, `user-pw`/`password`/`passwd`/`pw`/`secret`/`token`
//!   keys in properties and arguments (`--key=value`, `--key value`), secret environment values
//!   and URL query tokens are redacted from statuses, events, logs, errors, metrics and `Debug`,
//!   and from output lines before they are cut. The command line itself is visible in
//!   `/proc/PID/cmdline`: see `docs/producer.md`.
//! * **Names**: [`StreamNamer`] makes `{user}_{n}`, converts to the KVS form (`_` → `-`),
//!   validates custom names and enforces [`MAX_STREAMS_PER_USER`].
//!
//! # Metrics
//!
//! With [`SupervisorBuilder::metrics_registry`], in the caller's registry, labelled `stream`:
//!
//! | metric | type | meaning |
//! |---|---|---|
//! | `kvs_producer_state` | gauge | 0 stopped, 1 starting, 2 running, 3 backoff, 4 stopping, 5 fatal, 6 unkillable |
//! | `kvs_producer_restarts_total` | counter, + `reason` | restarts by [`RestartReason`] |
//! | `kvs_producer_uptime_seconds` | gauge | how long the current process has run |
//! | `kvs_producer_cpu_percent` | gauge | CPU of the process group, percent of one core |
//! | `kvs_producer_resident_memory_bytes` | gauge | resident memory of the process group |
//! | `kvs_producer_last_heartbeat_timestamp_seconds` | gauge | Unix time of the last heartbeat line |
//!
//! # Example
//!
//! ```no_run
//! use std::time::Duration;
//! use kvs_frames::producer::{KvsGstreamerSample, ProducerSpec, StopMode, Supervisor};
//!
//! # async fn run() -> kvs_frames::Result<()> {
//! let registry = prometheus::Registry::new();
//! let supervisor = Supervisor::builder()
//!     .id("camera-service")
//!     .metrics_registry(&registry)
//!     .build()
//!     .await?;
//! for action in supervisor.orphans() {
//!     tracing::info!("orphan of an earlier run: {action:?}");
//! }
//! let mut events = supervisor.events();
//! supervisor
//!     .start(ProducerSpec::new(
//!         "front-door",
//!         "rtsp://admin:secret@10.0.0.5:554/Streaming/Channels/101",
//!         KvsGstreamerSample::new().aws_region("eu-west-1"),
//!     ))
//!     .await?;
//! supervisor
//!     .wait_for_state("front-door", kvs_frames::producer::ProducerState::Running, Duration::from_secs(60))
//!     .await?;
//! while let Ok(event) = events.recv().await {
//!     tracing::info!("{}: {} → {} ({})", event.stream_name, event.from, event.to, event.reason);
//!     # break;
//! }
//! let report = supervisor.stop_all(StopMode::Graceful).await;
//! assert!(report.is_success(), "{:?}", report.error_messages());
//! # Ok(()) }
//! ```
//!
//! See `docs/producer.md` for the restart policy, stall detection and the stop semantics of
//! each producer kind.

mod child;
mod health;
mod identity;
mod ledger;
mod metrics;
mod naming;
mod orphans;
mod procfs;
mod restart;
mod secrets;
mod spec;
mod status;
mod supervisor;

pub use naming::{
    MAX_STREAM_NAME_LEN, MAX_STREAMS_PER_USER, StreamNamer, sanitize_user, to_kvs_name,
    validate_stream_name,
};
pub use orphans::{OrphanAction, OrphanOutcome, OrphanPolicy};
pub use restart::{RestartPolicy, StartLimit};
pub use spec::{
    CustomCommand, DEFAULT_ERROR_PATTERNS, DEFAULT_HEARTBEAT_LINE,
    DEFAULT_KVS_SAMPLE_READINESS_LINE, GstLaunchKvssink, KVS_BINARY_PATH_ENV, KvsGstreamerSample,
    MAX_PERIOD, MAX_START_STOP, ProducerCommand, ProducerSpec, RtspUrl,
};
pub use status::{
    BulkFailure, BulkReport, ExitKind, LastExit, OutputLine, ProducerEvent, ProducerHealth,
    ProducerState, ProducerStatus, RestartReason, StopMode,
};
pub use supervisor::{MAX_EVENT_CAPACITY, MAX_KILL_TIMEOUT, Supervisor, SupervisorBuilder};
