//! The [`Supervisor`]: one tokio task per producer, a `/proc` sampler, events and metrics.
//!
//! * [`builder`]: the options ([`SupervisorBuilder`]) and [`SupervisorBuilder::build`].
//! * [`registry`]: the [`Supervisor`] handle, its registry of producers and its public API.
//! * [`state`]: the state of one producer shared between its runner, the sampler and the API.
//! * [`runner`]: the task that runs one producer: launch, backoff, restart, Fatal.
//! * [`watch`]: watching one process: readiness, stable period, stall watchdog, commands.
//! * [`stop`]: stopping one process group with bounded waits, and unkillable processes.
//! * [`sampler`]: CPU, memory and uptime from `/proc`, and orphans that ended.

use std::time::Duration;

mod builder;
mod registry;
mod runner;
mod sampler;
mod state;
mod stop;
mod watch;

pub use builder::{MAX_EVENT_CAPACITY, MAX_KILL_TIMEOUT, SupervisorBuilder};
pub use registry::Supervisor;
pub(crate) use state::StatusInner;

/// How long the output readers may take to drain the last lines after a process ended.
const READER_GRACE: Duration = Duration::from_secs(2);

fn human(d: Duration) -> String {
    if d < Duration::from_secs(10) {
        format!("{:.1} s", d.as_secs_f64())
    } else {
        format!("{} s", d.as_secs())
    }
}
