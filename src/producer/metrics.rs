//! Producer metrics, registered in the caller's Prometheus registry.

use prometheus::{GaugeVec, IntCounterVec, IntGaugeVec, Opts, Registry};

use crate::error::{Error, ErrorKind, Result};

use super::status::{ProducerState, RestartReason};

/// The producer collectors, all labelled `stream`.
#[derive(Clone)]
pub(crate) struct ProducerMetrics {
    state: IntGaugeVec,
    restarts: IntCounterVec,
    uptime: GaugeVec,
    cpu: GaugeVec,
    rss: IntGaugeVec,
    heartbeat: GaugeVec,
}

fn reg_err(e: prometheus::Error) -> Error {
    let kind = match e {
        prometheus::Error::AlreadyReg => ErrorKind::AlreadyExists,
        _ => ErrorKind::InvalidConfig,
    };
    Error::new(kind, format!("registering producer metrics: {e}"))
}

impl ProducerMetrics {
    pub fn register(registry: &Registry) -> Result<Self> {
        let state = IntGaugeVec::new(
            Opts::new(
                "kvs_producer_state",
                "Producer state: 0 stopped, 1 starting, 2 running, 3 backoff, 4 stopping, 5 fatal, \
                 6 unkillable",
            ),
            &["stream"],
        )
        .map_err(reg_err)?;
        let restarts = IntCounterVec::new(
            Opts::new(
                "kvs_producer_restarts_total",
                "Producer restarts by reason (exit_success, exit_failure, signal, stall, \
                 spawn_failure, manual)",
            ),
            &["stream", "reason"],
        )
        .map_err(reg_err)?;
        let uptime = GaugeVec::new(
            Opts::new(
                "kvs_producer_uptime_seconds",
                "Seconds the current producer process has run (0 when none runs)",
            ),
            &["stream"],
        )
        .map_err(reg_err)?;
        let cpu = GaugeVec::new(
            Opts::new(
                "kvs_producer_cpu_percent",
                "CPU used by the producer's process group, percent of one core",
            ),
            &["stream"],
        )
        .map_err(reg_err)?;
        let rss = IntGaugeVec::new(
            Opts::new(
                "kvs_producer_resident_memory_bytes",
                "Resident memory of the producer's process group",
            ),
            &["stream"],
        )
        .map_err(reg_err)?;
        let heartbeat = GaugeVec::new(
            Opts::new(
                "kvs_producer_last_heartbeat_timestamp_seconds",
                "Unix time of the producer's latest heartbeat line",
            ),
            &["stream"],
        )
        .map_err(reg_err)?;
        for c in [
            Box::new(state.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(restarts.clone()),
            Box::new(uptime.clone()),
            Box::new(cpu.clone()),
            Box::new(rss.clone()),
            Box::new(heartbeat.clone()),
        ] {
            registry.register(c).map_err(reg_err)?;
        }
        Ok(ProducerMetrics {
            state,
            restarts,
            uptime,
            cpu,
            rss,
            heartbeat,
        })
    }

    /// Creates every series of `stream` (restarts at 0 for every reason).
    pub fn add(&self, stream: &str) {
        for reason in RestartReason::ALL {
            self.restarts.with_label_values(&[stream, reason.as_str()]);
        }
        self.state.with_label_values(&[stream]);
        self.uptime.with_label_values(&[stream]);
    }

    pub fn set_state(&self, stream: &str, state: ProducerState) {
        self.state
            .with_label_values(&[stream])
            .set(state.gauge_value());
    }

    pub fn restart(&self, stream: &str, reason: RestartReason) {
        self.restarts
            .with_label_values(&[stream, reason.as_str()])
            .inc();
    }

    pub fn set_process(
        &self,
        stream: &str,
        uptime_secs: f64,
        cpu_percent: Option<f64>,
        rss_bytes: Option<u64>,
    ) {
        self.uptime.with_label_values(&[stream]).set(uptime_secs);
        match cpu_percent {
            Some(cpu) => self.cpu.with_label_values(&[stream]).set(cpu),
            None => {
                let _ = self.cpu.remove_label_values(&[stream]);
            }
        }
        match rss_bytes {
            Some(rss) => self
                .rss
                .with_label_values(&[stream])
                .set(i64::try_from(rss).unwrap_or(i64::MAX)),
            None => {
                let _ = self.rss.remove_label_values(&[stream]);
            }
        }
    }

    pub fn set_heartbeat(&self, stream: &str, unix_secs: f64) {
        self.heartbeat.with_label_values(&[stream]).set(unix_secs);
    }

    /// Removes every series of `stream`.
    pub fn remove(&self, stream: &str) {
        let _ = self.state.remove_label_values(&[stream]);
        let _ = self.uptime.remove_label_values(&[stream]);
        let _ = self.cpu.remove_label_values(&[stream]);
        let _ = self.rss.remove_label_values(&[stream]);
        let _ = self.heartbeat.remove_label_values(&[stream]);
        for reason in RestartReason::ALL {
            let _ = self
                .restarts
                .remove_label_values(&[stream, reason.as_str()]);
        }
    }
}
