//! Producers left behind by an earlier supervisor instance (crashed, killed with SIGKILL,
//! host service restarted): found through the marker in their environment, then killed or
//! adopted.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::child::{ENV_INSTANCE, ENV_PRODUCER, ENV_SUPERVISOR_ID, signal_group, signal_pid};
use super::procfs::{self, ProcStat};

/// What to do with the producers of an earlier supervisor instance with the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OrphanPolicy {
    /// Stop them (SIGINT to the group, SIGKILL after the orphan stop timeout). The safe choice:
    /// their output pipes went with the old supervisor, so nobody watches them.
    #[default]
    Kill,
    /// Keep each orphaned producer running and take it over when a producer with the same
    /// stream name is started. An adopted process is watched through `/proc` only: no output,
    /// no readiness or heartbeat lines (the stall watchdog does not apply), exit status
    /// unknown; when it ends it is restarted as a child of this supervisor. Orphans not
    /// claimed are killed by [`Supervisor::stop_all`](super::Supervisor::stop_all) and when the
    /// supervisor is dropped.
    Adopt,
    /// Leave them alone (only report them).
    Ignore,
}

/// What the supervisor did with one orphaned process group.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum OrphanOutcome {
    /// Stopped by SIGINT.
    Stopped,
    /// Still alive after the stop timeout: killed with SIGKILL.
    Killed,
    /// Could not be stopped (still alive after SIGKILL, or not ours to signal).
    Failed(String),
    /// Kept running for adoption.
    Adopted,
    /// Left alone: [`OrphanPolicy::Ignore`], or its supervisor is still alive.
    LeftRunning(String),
}

/// One orphaned process group found at start.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct OrphanAction {
    /// The group leader (or the lowest pid when the leader is gone).
    pub pid: u32,
    /// The process group.
    pub pgid: u32,
    /// The processes in the group carrying the marker.
    pub processes: usize,
    /// The stream it fed, from its marker.
    pub stream_name: Option<String>,
    /// The pid of the supervisor that started it.
    pub supervisor_pid: Option<u32>,
    /// What was done.
    pub outcome: OrphanOutcome,
}

/// An orphan kept for adoption.
#[derive(Clone, Debug)]
pub(crate) struct Adoptable {
    pub pid: u32,
    pub start_ticks: u64,
    pub started_at: Option<SystemTime>,
}

/// Nonces of the supervisor instances alive in this process.
fn live_instances() -> &'static Mutex<HashSet<u64>> {
    static LIVE: OnceLock<Mutex<HashSet<u64>>> = OnceLock::new();
    LIVE.get_or_init(|| Mutex::new(HashSet::new()))
}

pub(crate) fn register_instance(nonce: u64) {
    live_instances().lock().insert(nonce);
}

pub(crate) fn unregister_instance(nonce: u64) {
    live_instances().lock().remove(&nonce);
}

/// `(pid, start ticks)` of this process.
pub(crate) fn own_identity() -> (i32, u64) {
    let pid = i32::try_from(std::process::id()).unwrap_or(0);
    let start = procfs::read_stat(pid).map_or(0, |s| s.start_ticks);
    (pid, start)
}

pub(crate) fn instance_marker(nonce: u64) -> String {
    let (pid, start) = own_identity();
    format!("{pid}.{start}.{nonce}")
}

/// Whether the supervisor instance of a process is alive.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Owner {
    Alive,
    Dead,
    /// No valid instance marker: never touch such a process.
    Unknown,
}

/// The state of the supervisor instance `marker` (`pid.start.nonce`).
fn owner(marker: &str, own: (i32, u64)) -> Owner {
    let mut parts = marker.splitn(3, '.');
    let (Some(pid), Some(start), Some(nonce)) = (
        parts.next().and_then(|p| p.parse::<i32>().ok()),
        parts.next().and_then(|p| p.parse::<u64>().ok()),
        parts.next().and_then(|p| p.parse::<u64>().ok()),
    ) else {
        return Owner::Unknown;
    };
    let alive = if (pid, start) == own {
        live_instances().lock().contains(&nonce)
    } else {
        procfs::is_alive(pid, Some(start))
    };
    if alive { Owner::Alive } else { Owner::Dead }
}

fn instance_pid(marker: &str) -> Option<u32> {
    marker.split('.').next()?.parse().ok()
}

struct Found {
    stat: ProcStat,
    stream: Option<String>,
    instance: String,
}

/// Boot time (Unix seconds), for the start time of adopted processes.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

fn started_at(start_ticks: u64) -> Option<SystemTime> {
    let secs = boot_time()? as f64 + start_ticks as f64 / procfs::clock_ticks_per_second() as f64;
    SystemTime::UNIX_EPOCH.checked_add(Duration::from_secs_f64(secs))
}

/// Finds the orphans of supervisor `id` and applies `policy`. Returns the report and the
/// processes kept for adoption, by stream name.
pub(crate) async fn handle_orphans(
    id: &str,
    policy: OrphanPolicy,
    stop_timeout: Duration,
) -> (Vec<OrphanAction>, HashMap<String, Adoptable>) {
    let own = own_identity();
    let stats = procfs::all_stats();
    let mut found: Vec<Found> = Vec::new();
    for stat in &stats {
        if stat.pid == own.0 {
            continue;
        }
        let Ok(env) = procfs::environ(stat.pid) else {
            continue;
        };
        let get = |key: &str| env.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        if get(ENV_SUPERVISOR_ID).as_deref() != Some(id) {
            continue;
        }
        found.push(Found {
            stat: *stat,
            stream: get(ENV_PRODUCER),
            instance: get(ENV_INSTANCE).unwrap_or_default(),
        });
    }
    // Group by process group.
    let mut groups: BTreeMap<i32, Vec<Found>> = BTreeMap::new();
    for f in found {
        groups.entry(f.stat.pgrp).or_default().push(f);
    }
    let mut report = Vec::new();
    let mut adoptable: HashMap<String, Adoptable> = HashMap::new();
    let mut to_stop: Vec<(usize, i32, Vec<i32>, bool)> = Vec::new(); // report index, pgid, pids, whole group
    for (pgid, members) in groups {
        let leader = members
            .iter()
            .find(|m| m.stat.pid == pgid)
            .or_else(|| members.iter().min_by_key(|m| m.stat.pid));
        let Some(leader) = leader else { continue };
        let mut action = OrphanAction {
            pid: u32::try_from(leader.stat.pid).unwrap_or(0),
            pgid: u32::try_from(pgid).unwrap_or(0),
            processes: members.len(),
            stream_name: leader.stream.clone(),
            supervisor_pid: instance_pid(&leader.instance),
            outcome: OrphanOutcome::LeftRunning(String::new()),
        };
        // Only groups whose every member names the same, dead, supervisor instance are ours
        // to stop or adopt.
        let owners: Vec<Owner> = members.iter().map(|m| owner(&m.instance, own)).collect();
        let same_instance = members.iter().all(|m| m.instance == leader.instance);
        if owners.contains(&Owner::Unknown) || !same_instance {
            action.outcome = OrphanOutcome::LeftRunning(
                "its supervisor cannot be identified (invalid KVS_FRAMES_SUPERVISOR_INSTANCE)"
                    .to_owned(),
            );
            report.push(action);
            continue;
        }
        if owners.contains(&Owner::Alive) {
            action.outcome = OrphanOutcome::LeftRunning(format!(
                "its supervisor (pid {}) is still running",
                action.supervisor_pid.unwrap_or(0)
            ));
            tracing::warn!(
                pid = action.pid,
                stream = action.stream_name.as_deref().unwrap_or("?"),
                "a producer of another running supervisor with id {id:?} was found: left alone"
            );
            report.push(action);
            continue;
        }
        let leader_is_group = leader.stat.pid == pgid;
        match policy {
            OrphanPolicy::Ignore => {
                action.outcome = OrphanOutcome::LeftRunning("orphan policy Ignore".to_owned());
            }
            OrphanPolicy::Adopt
                if leader_is_group
                    && leader
                        .stream
                        .as_ref()
                        .is_some_and(|s| !adoptable.contains_key(s)) =>
            {
                if let Some(stream) = &leader.stream {
                    adoptable.insert(
                        stream.clone(),
                        Adoptable {
                            pid: action.pid,
                            start_ticks: leader.stat.start_ticks,
                            started_at: started_at(leader.stat.start_ticks),
                        },
                    );
                }
                action.outcome = OrphanOutcome::Adopted;
            }
            OrphanPolicy::Kill | OrphanPolicy::Adopt => {
                // Signal the whole group only when every live member is an orphan of ours.
                let whole_group = stats
                    .iter()
                    .filter(|s| s.pgrp == pgid)
                    .all(|s| members.iter().any(|m| m.stat.pid == s.pid));
                let pids = members.iter().map(|m| m.stat.pid).collect();
                to_stop.push((report.len(), pgid, pids, whole_group));
            }
        }
        report.push(action);
    }
    if !to_stop.is_empty() {
        stop_orphans(&mut report, &to_stop, stop_timeout).await;
    }
    for action in &report {
        tracing::info!(
            pid = action.pid,
            pgid = action.pgid,
            stream = action.stream_name.as_deref().unwrap_or("?"),
            outcome = ?action.outcome,
            "orphaned producer of an earlier supervisor {id:?}"
        );
    }
    (report, adoptable)
}

async fn stop_orphans(
    report: &mut [OrphanAction],
    to_stop: &[(usize, i32, Vec<i32>, bool)],
    stop_timeout: Duration,
) {
    let send = |signal: i32| {
        for (_, pgid, pids, whole) in to_stop {
            if *whole {
                signal_group(*pgid, signal);
            } else {
                for pid in pids {
                    signal_pid(*pid, signal);
                }
            }
        }
    };
    let all_gone = |pids: &[i32]| pids.iter().all(|p| !procfs::is_alive(*p, None));
    send(libc::SIGINT);
    let deadline = Instant::now() + stop_timeout;
    while Instant::now() < deadline && !to_stop.iter().all(|(_, _, pids, _)| all_gone(pids)) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut killed = HashSet::new();
    for (i, _, pids, _) in to_stop {
        if !all_gone(pids) {
            killed.insert(*i);
        }
    }
    if !killed.is_empty() {
        send(libc::SIGKILL);
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !to_stop.iter().all(|(_, _, pids, _)| all_gone(pids)) {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    for (i, _, pids, _) in to_stop {
        report[*i].outcome = if !all_gone(pids) {
            OrphanOutcome::Failed("still alive after SIGKILL".to_owned())
        } else if killed.contains(i) {
            OrphanOutcome::Killed
        } else {
            OrphanOutcome::Stopped
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn instance_liveness() {
        let own = own_identity();
        let nonce = 0xfeed_beef;
        let marker = instance_marker(nonce);
        assert_eq!(owner(&marker, own), Owner::Dead);
        register_instance(nonce);
        assert_eq!(owner(&marker, own), Owner::Alive);
        unregister_instance(nonce);
        assert_eq!(owner(&marker, own), Owner::Dead);
        assert_eq!(owner("garbage", own), Owner::Unknown);
        assert_eq!(owner("", own), Owner::Unknown);
        // Our pid with another start time: an earlier process that had our pid.
        assert_eq!(
            owner(&format!("{}.{}.1", own.0, own.1 + 1), own),
            Owner::Dead
        );
        assert_eq!(instance_pid("123.4.5"), Some(123));
        assert!(started_at(0).is_some());
    }
}
