//! The `/proc` sampler: CPU, memory and uptime of every producer from one scan per interval,
//! and orphans kept for adoption that ended.

use std::collections::HashMap;
use std::sync::{Arc, Weak};
use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use crate::producer::identity::{self, Check};
use crate::producer::procfs;

use super::registry::Shared;
use super::state::ProducerShared;

/// Samples CPU, memory and uptime of every producer from one `/proc` scan per interval, and
/// forgets orphans kept for adoption that are gone.
pub(super) async fn sample_loop(shared: Weak<Shared>, interval: Duration) {
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
