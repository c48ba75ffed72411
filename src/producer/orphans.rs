//! Producers left behind by an earlier supervisor instance (crashed, killed with SIGKILL,
//! host service restarted): found through the marker in their environment, proven ours by
//! the ledger of the dead instance, then killed, adopted or left alone.
//!
//! A process is an orphan of supervisor `id` only when all of these hold:
//! 1. its environment carries `KVS_FRAMES_SUPERVISOR_ID=id` and a valid instance marker
//!    (`pid.start.nonce.boot_id.pid_namespace`) of this boot and this PID namespace;
//! 2. the ledger of a supervisor instance of that id records exactly this process (pid and
//!    start time) as the leader of its process group;
//! 3. that instance is no longer alive.
//!
//! Anything else that carries the marker is left untouched and reported. Every signal is sent
//! after checking the process's identity again, immediately before.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use parking_lot::Mutex;
use tokio::time::Instant;

use super::child::{ENV_INSTANCE, ENV_PRODUCER, ENV_SUPERVISOR_ID};
use super::identity::{self, Check, Identity, Reach};
use super::ledger::{self, Ledger, LedgerDoc, LedgerEntry};
use super::procfs::{self, ProcStat};

/// What to do with the producers of an earlier supervisor instance with the same id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum OrphanPolicy {
    /// Stop them (SIGINT to the group, SIGKILL after the orphan stop timeout, then at most the
    /// kill timeout for them to end). The safe choice: their output pipes went with the old
    /// supervisor, so nobody watches them.
    #[default]
    Kill,
    /// Keep each orphaned producer running and take it over when a producer with the same
    /// stream name is started. An adopted process is watched through `/proc` only: no output,
    /// no readiness or heartbeat lines (the stall watchdog does not apply), exit status
    /// unknown; when it ends it is restarted as a child of this supervisor. Orphans not
    /// claimed are stopped by [`Supervisor::stop_all`](super::Supervisor::stop_all) (SIGINT,
    /// then SIGKILL) and killed when the supervisor is dropped; one that ends by itself is
    /// forgotten.
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
    /// Could not be stopped (still alive after SIGKILL and the kill timeout: stuck in the
    /// kernel or held by a tracer).
    Failed(String),
    /// Kept running for adoption.
    Adopted,
    /// Left alone, with the reason: [`OrphanPolicy::Ignore`]; its supervisor is still alive;
    /// or it is not provably ours (no ledger records it — a process started by someone else
    /// with the same command line or environment —, an invalid marker, a marker of another
    /// boot or PID namespace, a group without its leader).
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
    /// The pid of the supervisor that started (or last kept) it, from its marker or ledger.
    pub supervisor_pid: Option<u32>,
    /// What was done.
    pub outcome: OrphanOutcome,
}

/// An orphan kept for adoption.
#[derive(Clone, Debug)]
pub(crate) struct Adoptable {
    pub identity: Identity,
    pub started_at: Option<SystemTime>,
    pub entry: LedgerEntry,
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

/// A supervisor instance, as written in markers and ledgers:
/// `pid.start_ticks.nonce.boot_id.pid_namespace`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Instance {
    pub pid: i32,
    pub start_ticks: u64,
    pub nonce: u64,
    pub boot_id: String,
    pub pid_namespace: u64,
}

impl Instance {
    /// This process, with `nonce`.
    pub fn current(nonce: u64) -> Instance {
        let pid = i32::try_from(std::process::id()).unwrap_or(0);
        Instance {
            pid,
            start_ticks: procfs::read_stat(pid).map_or(0, |s| s.start_ticks),
            nonce,
            boot_id: identity::boot_id().to_string(),
            pid_namespace: identity::pid_namespace(),
        }
    }

    pub fn marker(&self) -> String {
        format!(
            "{}.{}.{}.{}.{}",
            self.pid, self.start_ticks, self.nonce, self.boot_id, self.pid_namespace
        )
    }

    pub fn parse(marker: &str) -> Option<Instance> {
        let mut parts = marker.split('.');
        let instance = Instance {
            pid: parts.next()?.parse().ok().filter(|&p| p > 0)?,
            start_ticks: parts.next()?.parse().ok()?,
            nonce: parts.next()?.parse().ok()?,
            boot_id: parts
                .next()
                .filter(|b| !b.is_empty() && b.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'))?
                .to_owned(),
            pid_namespace: parts.next()?.parse().ok()?,
        };
        parts.next().is_none().then_some(instance)
    }
}

/// Whose a recorded instance is, seen from `own`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Owner {
    Alive,
    Dead,
    /// Of another boot or PID namespace: its pids mean other processes here.
    Foreign(&'static str),
}

fn owner(instance: &Instance, own: &Instance) -> Owner {
    if instance.boot_id != own.boot_id {
        return Owner::Foreign("another boot");
    }
    if instance.pid_namespace != own.pid_namespace {
        return Owner::Foreign("another PID namespace");
    }
    let alive = if (instance.pid, instance.start_ticks) == (own.pid, own.start_ticks) {
        live_instances().lock().contains(&instance.nonce)
    } else {
        procfs::is_alive(instance.pid, Some(instance.start_ticks))
    };
    if alive { Owner::Alive } else { Owner::Dead }
}

struct Found {
    stat: ProcStat,
    stream: Option<String>,
    marker: String,
}

/// Boot time (Unix seconds), for the start time of adopted processes.
fn boot_time() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/stat").ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("btime "))
        .and_then(|v| v.trim().parse().ok())
}

pub(crate) fn started_at(start_ticks: u64) -> Option<SystemTime> {
    let secs = boot_time()? as f64 + start_ticks as f64 / procfs::clock_ticks_per_second() as f64;
    SystemTime::UNIX_EPOCH.checked_add(Duration::try_from_secs_f64(secs).ok()?)
}

/// What orphan handling needs.
pub(crate) struct OrphanOptions {
    pub id: String,
    pub policy: OrphanPolicy,
    pub stop_timeout: Duration,
    pub kill_timeout: Duration,
    pub state_dir: PathBuf,
    pub ledger: Arc<Ledger>,
    pub own: Instance,
}

/// How long the `/proc` scan may take before orphan handling gives up (a process whose
/// memory cannot be read can block a read of its environment).
const SCAN_TIMEOUT: Duration = Duration::from_secs(30);

/// What one scan of `/proc` and the ledgers found.
struct Scan {
    stats: Vec<ProcStat>,
    found: Vec<Found>,
    ledgers: Vec<(PathBuf, LedgerDoc)>,
    /// Held until the ledgers are updated.
    _lock: Option<std::fs::File>,
}

fn scan(id: &str, dir: &Path, own_ledger: &Path, own: &Instance) -> Scan {
    let lock = ledger::lock(dir, Duration::from_secs(10));
    // Ledgers of dead instances (of any id) whose processes are all gone.
    let gone = |e: &LedgerEntry| {
        Identity {
            pid: e.pid,
            start_ticks: e.start_ticks,
            boot_id: identity::boot_id().clone(),
        }
        .check()
            == Check::Gone
    };
    ledger::collect_garbage(
        dir,
        |instance| match Instance::parse(instance) {
            Some(i) => {
                owner(&i, own) == Owner::Dead || owner(&i, own) == Owner::Foreign("another boot")
            }
            None => false,
        },
        |e| gone(e),
    );
    let own_pid = i32::try_from(std::process::id()).unwrap_or(0);
    let stats = procfs::all_stats();
    let mut found = Vec::new();
    for stat in &stats {
        if stat.pid == own_pid {
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
            marker: get(ENV_INSTANCE).unwrap_or_default(),
        });
    }
    Scan {
        stats,
        found,
        ledgers: ledger::read_others(dir, id, own_ledger),
        _lock: lock,
    }
}

/// What to do with one group.
enum Plan {
    Leave,
    Adopt,
    Stop {
        /// Signal the leader's group (every member is ours), else each member alone.
        whole_group: bool,
        leader: Identity,
        members: Vec<Identity>,
    },
}

/// Finds the orphans of supervisor `id` and applies the policy. Returns the report and the
/// processes kept for adoption, by stream name. The `/proc` scan runs on a blocking thread;
/// every wait is bounded.
pub(crate) async fn handle_orphans(
    opts: &OrphanOptions,
) -> (Vec<OrphanAction>, HashMap<String, Adoptable>) {
    if !identity::proc_shows_own_namespace() {
        tracing::warn!(
            "/proc does not show this process's PID namespace: orphans of earlier supervisors \
             are not looked for"
        );
        return (Vec::new(), HashMap::new());
    }
    let scan = {
        let id = opts.id.clone();
        let dir = opts.state_dir.clone();
        let own_path = opts.ledger.path().to_path_buf();
        let own = opts.own.clone();
        let task = tokio::task::spawn_blocking(move || scan(&id, &dir, &own_path, &own));
        match tokio::time::timeout(SCAN_TIMEOUT, task).await {
            Ok(Ok(scan)) => scan,
            Ok(Err(e)) => {
                tracing::warn!("the orphan scan failed: {e}");
                return (Vec::new(), HashMap::new());
            }
            Err(_) => {
                tracing::warn!(
                    "the orphan scan of /proc did not finish within {SCAN_TIMEOUT:?}: orphans \
                     are not handled"
                );
                return (Vec::new(), HashMap::new());
            }
        }
    };
    let id = opts.id.as_str();
    let own = &opts.own;
    // Which ledger records a process, and whether its keeper is alive.
    let owners: Vec<Option<Owner>> = scan
        .ledgers
        .iter()
        .map(|(_, doc)| Instance::parse(&doc.instance).map(|i| owner(&i, own)))
        .collect();
    // Only ledgers of this boot and PID namespace can record a process here.
    let recorded = |pid: i32, start: u64| {
        scan.ledgers
            .iter()
            .enumerate()
            .filter(|(i, _)| matches!(owners[*i], Some(Owner::Alive | Owner::Dead)))
            .flat_map(|(i, (_, doc))| doc.children.iter().map(move |e| (i, e)))
            .filter(|(_, e)| e.pid == pid && e.start_ticks == start)
            .collect::<Vec<_>>()
    };
    let mut groups: BTreeMap<i32, Vec<&Found>> = BTreeMap::new();
    for f in &scan.found {
        groups.entry(f.stat.pgrp).or_default().push(f);
    }
    let mut report = Vec::new();
    let mut plans = Vec::new();
    let mut adoptable: HashMap<String, Adoptable> = HashMap::new();
    for (pgid, members) in groups {
        let leader = members.iter().find(|m| m.stat.pid == pgid).copied();
        let first = leader.or_else(|| members.iter().min_by_key(|m| m.stat.pid).copied());
        let Some(first) = first else { continue };
        let marker = Instance::parse(&first.marker);
        let mut action = OrphanAction {
            pid: u32::try_from(first.stat.pid).unwrap_or(0),
            pgid: u32::try_from(pgid).unwrap_or(0),
            processes: members.len(),
            stream_name: first.stream.clone(),
            supervisor_pid: marker.as_ref().and_then(|m| u32::try_from(m.pid).ok()),
            outcome: OrphanOutcome::LeftRunning(String::new()),
        };
        let leave = |why: String| OrphanOutcome::LeftRunning(why);
        let decision: Result<(&Found, usize), String> = (|| {
            let Some(marker) = &marker else {
                return Err(format!(
                    "its {ENV_INSTANCE} marker is invalid ({:?}): not provably ours",
                    first.marker.chars().take(80).collect::<String>()
                ));
            };
            if members.iter().any(|m| m.marker != first.marker) {
                return Err("its members carry different supervisor markers".to_owned());
            }
            if let Owner::Foreign(what) = owner(marker, own) {
                return Err(format!(
                    "started by a supervisor of {what} (a container, or a host seen through \
                     hostPID): not ours"
                ));
            }
            let Some(leader) = leader else {
                return Err(format!(
                    "its group leader (pid {pgid}) is gone: the remaining processes cannot be \
                     proven ours"
                ));
            };
            let records = recorded(leader.stat.pid, leader.stat.start_ticks);
            let Some(&(file, entry)) = records.first() else {
                return Err(format!(
                    "no ledger of a supervisor with id {id:?} records pid {} with this start \
                     time: not started by one (a process with the same command line or \
                     environment?)",
                    leader.stat.pid
                ));
            };
            if entry.marker != leader.marker {
                return Err("its ledger entry does not match its marker".to_owned());
            }
            if let Some(&(alive, _)) = records
                .iter()
                .find(|(i, _)| owners[*i] == Some(Owner::Alive))
            {
                return Err(format!(
                    "its supervisor (pid {}) is still running",
                    Instance::parse(&scan.ledgers[alive].1.instance).map_or(0, |i| i.pid)
                ));
            }
            Ok((leader, file))
        })();
        let (leader, file) = match decision {
            Ok(ok) => ok,
            Err(why) => {
                tracing::warn!(
                    pid = action.pid,
                    stream = action.stream_name.as_deref().unwrap_or("?"),
                    "a process carrying the marker of supervisor id {id:?} is left alone: {why}"
                );
                action.outcome = leave(why);
                report.push(action);
                plans.push(Plan::Leave);
                continue;
            }
        };
        if let Some(i) = Instance::parse(&scan.ledgers[file].1.instance) {
            action.supervisor_pid = u32::try_from(i.pid).ok();
        }
        let leader_id = Identity {
            pid: leader.stat.pid,
            start_ticks: leader.stat.start_ticks,
            boot_id: identity::boot_id().clone(),
        };
        let entry = LedgerEntry {
            pid: leader.stat.pid,
            start_ticks: leader.stat.start_ticks,
            stream: leader.stream.clone().unwrap_or_default(),
            marker: leader.marker.clone(),
        };
        match opts.policy {
            OrphanPolicy::Ignore => {
                action.outcome = leave("orphan policy Ignore".to_owned());
                plans.push(Plan::Leave);
            }
            OrphanPolicy::Adopt
                if leader
                    .stream
                    .as_ref()
                    .is_some_and(|s| !adoptable.contains_key(s)) =>
            {
                adoptable.insert(
                    entry.stream.clone(),
                    Adoptable {
                        started_at: started_at(leader_id.start_ticks),
                        identity: leader_id,
                        entry,
                    },
                );
                action.outcome = OrphanOutcome::Adopted;
                plans.push(Plan::Adopt);
            }
            OrphanPolicy::Kill | OrphanPolicy::Adopt => {
                // Signal the whole group only when every live member carries the marker.
                let whole_group = scan
                    .stats
                    .iter()
                    .filter(|s| s.pgrp == pgid)
                    .all(|s| members.iter().any(|m| m.stat.pid == s.pid));
                let members = members
                    .iter()
                    .map(|m| Identity {
                        pid: m.stat.pid,
                        start_ticks: m.stat.start_ticks,
                        boot_id: identity::boot_id().clone(),
                    })
                    .collect();
                plans.push(Plan::Stop {
                    whole_group,
                    leader: leader_id,
                    members,
                });
            }
        }
        report.push(action);
    }
    // Under the lock: adopted processes move to our ledger and out of the dead instance's,
    // so that a supervisor deciding after us sees them kept by a live one.
    for a in adoptable.values() {
        opts.ledger.add(a.entry.clone());
    }
    let dead_ledgers: Vec<(PathBuf, LedgerDoc)> = scan
        .ledgers
        .iter()
        .zip(&owners)
        .filter(|(_, owner)| **owner == Some(Owner::Dead))
        .map(|((path, doc), _)| (path.clone(), doc.clone()))
        .collect();
    let adopted: Vec<(i32, u64)> = adoptable
        .values()
        .map(|a| (a.entry.pid, a.entry.start_ticks))
        .collect();
    let lock = scan._lock;
    prune_ledgers(dead_ledgers.clone(), adopted.clone(), lock).await;
    // Then, without the lock, stop what is to be stopped, and forget it.
    let outcomes = stop_plans(&plans, opts.stop_timeout, opts.kill_timeout).await;
    for (action, outcome) in report.iter_mut().zip(outcomes) {
        if let Some(outcome) = outcome {
            action.outcome = outcome;
        }
    }
    if plans.iter().any(|p| matches!(p, Plan::Stop { .. })) {
        prune_ledgers(dead_ledgers, adopted, None).await;
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

/// Rewrites the ledgers of dead instances without the `adopted` processes and those no longer
/// running (a ledger left empty is removed), on a blocking thread; then releases `lock`.
async fn prune_ledgers(
    ledgers: Vec<(PathBuf, LedgerDoc)>,
    adopted: Vec<(i32, u64)>,
    lock: Option<std::fs::File>,
) {
    let _ = tokio::task::spawn_blocking(move || {
        for (path, mut doc) in ledgers {
            let before = doc.children.len();
            doc.children.retain(|e| {
                !adopted.contains(&(e.pid, e.start_ticks))
                    && Identity {
                        pid: e.pid,
                        start_ticks: e.start_ticks,
                        boot_id: identity::boot_id().clone(),
                    }
                    .check()
                        == Check::Alive
            });
            if doc.children.len() == before && before > 0 {
                continue;
            }
            if let Err(e) = ledger::write(&path, &doc) {
                tracing::warn!(path = %path.display(), "cannot update a supervisor ledger: {e}");
            }
        }
        drop(lock);
    })
    .await;
}

/// Sends `signal` to the planned targets, each identity re-checked just before.
fn send(plan: &Plan, signal: i32) {
    if let Plan::Stop {
        whole_group,
        leader,
        members,
    } = plan
    {
        if *whole_group {
            let _ = identity::signal(leader, Reach::Group, signal);
        } else {
            for member in members {
                let _ = identity::signal(member, Reach::Process, signal);
            }
        }
    }
}

fn gone(plan: &Plan) -> bool {
    match plan {
        Plan::Stop { members, .. } => members.iter().all(|m| m.check() != Check::Alive),
        _ => true,
    }
}

/// Waits until every plan is done, or `deadline`, checking every 50 ms.
async fn wait_gone(plans: &[Plan], deadline: Instant) {
    while Instant::now() < deadline && !plans.iter().all(gone) {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Stops the planned groups: SIGINT, SIGKILL after `stop_timeout` for those still running,
/// then at most `kill_timeout` for them to end. One outcome per [`Plan::Stop`].
async fn stop_plans(
    plans: &[Plan],
    stop_timeout: Duration,
    kill_timeout: Duration,
) -> Vec<Option<OrphanOutcome>> {
    if !plans.iter().any(|p| matches!(p, Plan::Stop { .. })) {
        return plans.iter().map(|_| None).collect();
    }
    for plan in plans {
        send(plan, libc::SIGINT);
    }
    wait_gone(plans, deadline_after(stop_timeout)).await;
    let mut killed = HashSet::new();
    for (i, plan) in plans.iter().enumerate() {
        if !gone(plan) {
            killed.insert(i);
            send(plan, libc::SIGKILL);
        }
    }
    if !killed.is_empty() {
        wait_gone(plans, deadline_after(kill_timeout)).await;
    }
    plans
        .iter()
        .enumerate()
        .map(|(i, plan)| {
            matches!(plan, Plan::Stop { .. }).then(|| {
                if !gone(plan) {
                    OrphanOutcome::Failed(format!(
                        "still alive {kill_timeout:?} after SIGKILL (unkillable: stuck in the \
                         kernel or held by a tracer)"
                    ))
                } else if killed.contains(&i) {
                    OrphanOutcome::Killed
                } else {
                    OrphanOutcome::Stopped
                }
            })
        })
        .collect()
}

/// Stops orphans kept for adoption and never claimed (their group; the leader's identity
/// re-checked before each signal). One outcome per orphan.
pub(crate) async fn stop_unclaimed(
    orphans: &[Adoptable],
    stop_timeout: Duration,
    kill_timeout: Duration,
) -> Vec<OrphanOutcome> {
    let plans: Vec<Plan> = orphans
        .iter()
        .map(|a| Plan::Stop {
            whole_group: true,
            leader: a.identity.clone(),
            members: vec![a.identity.clone()],
        })
        .collect();
    stop_plans(&plans, stop_timeout, kill_timeout)
        .await
        .into_iter()
        .map(|o| o.unwrap_or(OrphanOutcome::Stopped))
        .collect()
}

/// `now + d`, saturating far in the future instead of overflowing.
pub(crate) fn deadline_after(d: Duration) -> Instant {
    let now = Instant::now();
    now.checked_add(d)
        .unwrap_or_else(|| now + Duration::from_secs(100 * 365 * 24 * 3600))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn markers_and_liveness() {
        let own = Instance::current(0xfeed_beef);
        let marker = own.marker();
        let parsed = Instance::parse(&marker).unwrap();
        assert_eq!(parsed, own);
        assert_eq!(owner(&parsed, &own), Owner::Dead);
        register_instance(own.nonce);
        assert_eq!(owner(&parsed, &own), Owner::Alive);
        unregister_instance(own.nonce);
        assert_eq!(owner(&parsed, &own), Owner::Dead);
        // Our pid with another start time: an earlier process that had our pid.
        let earlier = Instance {
            start_ticks: own.start_ticks + 1,
            ..own.clone()
        };
        assert_eq!(owner(&earlier, &own), Owner::Dead);
        // Another boot or PID namespace: never judged, never ours.
        let container = Instance {
            pid_namespace: own.pid_namespace + 1,
            ..own.clone()
        };
        assert_eq!(
            owner(&container, &own),
            Owner::Foreign("another PID namespace")
        );
        let other_boot = Instance {
            boot_id: "0000".into(),
            ..own.clone()
        };
        assert_eq!(owner(&other_boot, &own), Owner::Foreign("another boot"));
        for bad in [
            "",
            "garbage",
            "1.2.3",
            "0.2.3.ab.4",
            "1.2.3.b0ot.4",
            "1.2.3.ab.4.5",
            "-1.2.3.ab.4",
        ] {
            assert_eq!(Instance::parse(bad), None, "{bad}");
        }
        assert!(started_at(0).is_some());
        // Values from /proc never panic, however large.
        let _ = started_at(u64::MAX);
        assert!(deadline_after(Duration::MAX) > Instant::now());
    }
}
