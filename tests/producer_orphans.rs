//! Orphans across supervisor instances: a supervisor process dies (SIGKILL) and leaves its
//! producer running; the next instance with the same id finds it through /proc, proves it
//! its own through the dead instance's ledger, and kills, adopts or ignores it. Processes
//! that only look like its producers (same command line and environment, an invalid marker,
//! another PID namespace, a live supervisor) are left alone and reported. The dying
//! supervisor is this test binary run again as a helper process.

mod producer_support;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvs_frames::producer::{
    OrphanAction, OrphanOutcome, OrphanPolicy, ProducerState, StopMode, Supervisor,
};
use producer_support::*;

const T: Duration = Duration::from_secs(20);
const HELPER_ID: &str = "KVS_FRAMES_TEST_ORPHAN_HELPER_ID";
const HELPER_DIR: &str = "KVS_FRAMES_TEST_ORPHAN_HELPER_DIR";
/// The helper's state directory, when not the default.
const HELPER_STATE: &str = "KVS_FRAMES_TEST_ORPHAN_HELPER_STATE";

/// Run only as a helper process (see `spawn_dying_supervisor`): starts a supervisor and one
/// producer, prints `READY <pid>`, and waits to be killed.
#[test]
#[ignore = "helper process of the orphan tests"]
fn orphan_helper() {
    let (Ok(id), Ok(dir)) = (std::env::var(HELPER_ID), std::env::var(HELPER_DIR)) else {
        return;
    };
    let runtime = tokio::runtime::Runtime::new().unwrap();
    runtime.block_on(async {
        let mut builder = Supervisor::builder().id(id);
        if let Some(state) = std::env::var_os(HELPER_STATE) {
            builder = builder.state_dir(state);
        }
        let sup = builder.build().await.unwrap();
        let sdk = SdkDir { root: dir.into() };

        // Once this process dies, nobody reads the producer's pipes: it must survive writing
        // to them to stay an orphan.
        let spec = fake_spec("orphaned-cam", &sdk).env("FAKE_IGNORE_PIPE", "1");
        let status = sup.start(spec).await.unwrap();
        sup.wait_for_state("orphaned-cam", ProducerState::Running, T)
            .await
            .unwrap();
        println!("READY {}", status.pid.unwrap());
        std::mem::forget(sdk); // the parent test owns the directory
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

/// The helper process and its producer; both are killed if a test fails half-way.
struct Helper {
    child: Option<Child>,
    producer: u32,
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if alive(self.producer) {
            // SAFETY: kill(2) on the producer's own process group (pgid = its pid).
            unsafe {
                libc::kill(-i32::try_from(self.producer).unwrap(), libc::SIGKILL);
            }
        }
    }
}

/// Runs `orphan_helper` in a new process and returns it with its producer's pid.
fn spawn_dying_supervisor(id: &str, dir: &SdkDir) -> (Helper, u32) {
    spawn_helper(id, dir, &[])
}

/// Runs `orphan_helper` in a new process, behind `wrapper` (e.g. `unshare …`), and returns it
/// with its producer's pid as it printed it.
fn spawn_helper(id: &str, dir: &SdkDir, wrapper: &[&str]) -> (Helper, u32) {
    spawn_helper_in(id, dir, wrapper, None)
}

fn spawn_helper_in(
    id: &str,
    dir: &SdkDir,
    wrapper: &[&str],
    state_dir: Option<&std::path::Path>,
) -> (Helper, u32) {
    let exe = std::env::current_exe().unwrap();
    let mut command = match wrapper.split_first() {
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(&exe);
            c
        }
        None => Command::new(&exe),
    };
    let mut child = command
        .args([
            "orphan_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ID, id)
        .env(HELPER_DIR, &dir.root)
        .envs(state_dir.map(|d| (HELPER_STATE, d)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            // libtest prints `test orphan_helper ... ` before the test's own output.
            if let Some(i) = line.find("READY ") {
                let _ = tx.send(line[i + 6..].trim().parse::<u32>().unwrap());
            }
        }
    });
    let mut helper = Helper {
        child: Some(child),
        producer: 0,
    };
    let pid = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("helper ready");
    helper.producer = pid;
    (helper, pid)
}

/// SIGKILL: the supervisor dies without any cleanup, like a crash or an OOM kill.
fn crash(helper: &mut Helper) {
    let mut child = helper.child.take().unwrap();
    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_of_a_dead_supervisor_are_killed_by_the_next_one() {
    let dir = SdkDir::new("orphan-kill");
    let id = format!("test-orphan-kill-{}", std::process::id());
    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);
    // The producer outlived its supervisor.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(orphan), "the producer must survive its supervisor");

    let sup = Supervisor::builder()
        .id(&id)
        .orphan_stop_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    let actions = sup.orphans();
    assert_eq!(actions.len(), 1, "{actions:?}");
    let action = &actions[0];
    assert_eq!(action.pid, orphan);
    assert_eq!(action.pgid, orphan);
    assert_eq!(action.stream_name.as_deref(), Some("orphaned-cam"));
    assert!(action.processes >= 1);
    assert!(
        matches!(
            action.outcome,
            OrphanOutcome::Stopped | OrphanOutcome::Killed
        ),
        "{action:?}"
    );
    wait_for("the orphan's group to be gone", T, || {
        !alive(orphan) && group_members(orphan).is_empty()
    })
    .await;

    // The stream started again: one producer, not two.
    let status = sup.start(fake_spec("orphaned-cam", &dir)).await.unwrap();
    assert_ne!(status.pid, Some(orphan));
    assert_eq!(leaders_of(&id, "orphaned-cam"), [status.pid.unwrap()]);

    // A third instance finds nothing left to handle (the second one is alive).
    let report = sup.stop_all(StopMode::Graceful).await;
    assert!(report.is_success(), "{:?}", report.error_messages());
    drop(sup);
    let again = Supervisor::builder().id(&id).build().await.unwrap();
    assert!(again.orphans().is_empty(), "{:?}", again.orphans());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn orphans_can_be_adopted_and_then_stopped() {
    let dir = SdkDir::new("orphan-adopt");
    let id = format!("test-orphan-adopt-{}", std::process::id());
    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);

    let sup = Supervisor::builder()
        .id(&id)
        .orphan_policy(OrphanPolicy::Adopt)
        .stats_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    assert_eq!(sup.orphans().len(), 1);
    assert_eq!(sup.orphans()[0].outcome, OrphanOutcome::Adopted);
    assert!(alive(orphan));

    // Starting the same stream takes the orphan over instead of spawning a second producer.
    let status = sup.start(fake_spec("orphaned-cam", &dir)).await.unwrap();
    assert_eq!(status.pid, Some(orphan));
    assert!(status.adopted);
    assert_eq!(leaders_of(&id, "orphaned-cam"), [orphan]);
    // A supervisor built meanwhile (same id) sees the adopted orphan kept by a live one.
    let meanwhile = Supervisor::builder().id(&id).build().await.unwrap();
    assert!(
        matches!(meanwhile.orphans(), [OrphanAction { outcome: OrphanOutcome::LeftRunning(why), .. }] if why.contains("still running")),
        "{:?}",
        meanwhile.orphans()
    );
    drop(meanwhile);
    assert!(alive(orphan));
    assert_eq!(status.state, ProducerState::Running);
    assert!(
        status.state_reason.contains("adopted"),
        "{}",
        status.state_reason
    );
    assert!(status.started_at.is_some());
    let s = sup
        .wait_until("orphaned-cam", T, |s| s.rss_bytes.is_some())
        .await
        .unwrap();
    assert!(s.rss_bytes.unwrap() > 0);
    let health = sup.health("orphaned-cam").unwrap();
    assert!(
        health.recommendations.iter().any(|r| r.contains("Adopted")),
        "{health:?}"
    );

    // Stopping an adopted producer signals its group like any other.
    let stopped = sup.stop("orphaned-cam", StopMode::Graceful).await.unwrap();
    assert_eq!(stopped.state, ProducerState::Stopped);
    assert!(stopped.last_exit.unwrap().requested);
    wait_for("the adopted group to be gone", T, || {
        !alive(orphan) && group_members(orphan).is_empty()
    })
    .await;

    // Started again, it is an ordinary child.
    let status = sup.restart("orphaned-cam").await.unwrap();
    assert!(!status.adopted);
    assert_ne!(status.pid, Some(orphan));
    sup.stop_all(StopMode::Force).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_of_a_live_supervisor_are_left_alone() {
    let dir = SdkDir::new("orphan-live");
    let id = format!("test-orphan-live-{}", std::process::id());
    let first = Supervisor::builder().id(&id).build().await.unwrap();
    let pid = first
        .start(fake_spec("cam-1", &dir))
        .await
        .unwrap()
        .pid
        .unwrap();
    first
        .wait_for_state("cam-1", ProducerState::Running, T)
        .await
        .unwrap();
    // A second instance with the same id (a misconfiguration) must not kill them.
    let second = Supervisor::builder().id(&id).build().await.unwrap();
    assert_eq!(second.orphans().len(), 1);
    assert!(
        matches!(&second.orphans()[0].outcome, OrphanOutcome::LeftRunning(why) if why.contains("still running")),
        "{:?}",
        second.orphans()
    );
    assert!(alive(pid));
    assert!(first.status("cam-1").unwrap().state.is_active());
    // Another id does not even look at them.
    let other = Supervisor::builder()
        .id(format!("{id}-other"))
        .build()
        .await
        .unwrap();
    assert!(other.orphans().is_empty());
    first.stop_all(StopMode::Force).await;
    assert!(reaped(pid));
}

/// The environment of a process (empty when unreadable).
fn environ(pid: u32) -> HashMap<String, String> {
    let bytes = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
    bytes
        .split(|&b| b == 0)
        .filter_map(|e| {
            let (k, v) = std::str::from_utf8(e).ok()?.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

/// The live group leaders running the fake producer with supervisor `id`'s marker for
/// `stream`.
fn leaders_of(id: &str, stream: &str) -> Vec<u32> {
    let mut out: Vec<u32> = std::fs::read_dir("/proc")
        .unwrap()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|&pid| alive(pid) && group_members(pid).contains(&pid))
        .filter(|&pid| {
            std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
                .is_ok_and(|c| c.contains("fake_kvs_producer"))
        })
        .filter(|&pid| {
            let env = environ(pid);
            env.get("KVS_FRAMES_SUPERVISOR_ID").map(String::as_str) == Some(id)
                && env.get("KVS_FRAMES_PRODUCER").map(String::as_str) == Some(stream)
        })
        .collect();
    out.sort_unstable();
    out
}

/// A process the test started; SIGKILLed and reaped on drop.
struct Stranger(Child);

impl Stranger {
    fn pid(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for Stranger {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the group of a child of this test (its own group).
        unsafe {
            libc::kill(-i32::try_from(self.0.id()).unwrap(), libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

/// Starts `program args` in its own process group with exactly `env`.
fn stranger(program: &std::path::Path, args: &[String], env: &HashMap<String, String>) -> Stranger {
    use std::os::unix::process::CommandExt;
    Stranger(
        Command::new(program)
            .args(args)
            .env_clear()
            .envs(env)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    )
}

fn outcome_of(actions: &[OrphanAction], pid: u32) -> &OrphanOutcome {
    &actions
        .iter()
        .find(|a| a.pid == pid)
        .unwrap_or_else(|| panic!("no action for pid {pid} in {actions:?}"))
        .outcome
}

/// A supervisor killed with SIGKILL and restarted: its orphan is killed, once; a decoy with
/// the same command line and the same environment (the marker copied), started by someone
/// else, and processes with an invalid marker are left alive and reported.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_decoy_with_the_same_command_line_and_environment_is_never_signalled() {
    let dir = SdkDir::new("orphan-decoy");
    let id = format!("test-orphan-decoy-{}", std::process::id());
    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    // The decoy: the orphan's own command line and environment, marker included.
    let env = environ(orphan);
    assert_eq!(env.get("KVS_FRAMES_SUPERVISOR_ID"), Some(&id));
    let cmdline = std::fs::read(format!("/proc/{orphan}/cmdline")).unwrap();
    let argv: Vec<String> = cmdline
        .split(|&b| b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let script = fake_script();
    let at = argv
        .iter()
        .position(|a| std::path::Path::new(a) == script)
        .expect("the script in the orphan's command line");
    let decoy = stranger(&script, &argv[at + 1..], &env);
    wait_for("the decoy to run its script", T, || {
        std::fs::read(format!("/proc/{}/cmdline", decoy.pid())).is_ok_and(|c| c == cmdline)
    })
    .await;
    assert_eq!(
        std::fs::read(format!("/proc/{}/cmdline", decoy.pid())).unwrap(),
        cmdline,
        "the same command line"
    );
    // Markers that cannot be parsed, or of the old format.
    let mut bad = env.clone();
    bad.insert("KVS_FRAMES_SUPERVISOR_INSTANCE".into(), "garbage".into());
    let invalid = stranger(std::path::Path::new("/bin/sleep"), &["300".into()], &bad);
    bad.insert("KVS_FRAMES_SUPERVISOR_INSTANCE".into(), "1.2.3".into());
    let old_format = stranger(std::path::Path::new("/bin/sleep"), &["300".into()], &bad);
    crash(&mut helper);

    let sup = Supervisor::builder()
        .id(&id)
        .orphan_stop_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    let actions = sup.orphans();
    assert_eq!(actions.len(), 4, "{actions:?}");
    assert!(
        matches!(
            outcome_of(actions, orphan),
            OrphanOutcome::Stopped | OrphanOutcome::Killed
        ),
        "{actions:?}"
    );
    assert!(
        matches!(outcome_of(actions, decoy.pid()), OrphanOutcome::LeftRunning(why) if why.contains("no ledger")),
        "{actions:?}"
    );
    for pid in [invalid.pid(), old_format.pid()] {
        assert!(
            matches!(outcome_of(actions, pid), OrphanOutcome::LeftRunning(why) if why.contains("marker is invalid")),
            "{actions:?}"
        );
    }
    wait_for("the orphan to be gone", T, || !alive(orphan)).await;
    for pid in [decoy.pid(), invalid.pid(), old_format.pid()] {
        assert!(alive(pid), "pid {pid} was signalled");
    }
    // Only the decoy still claims the stream; starting it adds exactly one producer.
    assert_eq!(leaders_of(&id, "orphaned-cam"), [decoy.pid()]);
    let pid = sup
        .start(fake_spec("orphaned-cam", &dir))
        .await
        .unwrap()
        .pid
        .unwrap();
    let mut expected = vec![decoy.pid(), pid];
    expected.sort_unstable();
    assert_eq!(leaders_of(&id, "orphaned-cam"), expected);
    sup.stop_all(StopMode::Force).await;
    assert!(reaped(pid));
    assert!(alive(decoy.pid()), "stop_all never touches the decoy");
    // The next instance reports the strangers again, and has no orphan to handle.
    drop(sup);
    let next = Supervisor::builder().id(&id).build().await.unwrap();
    assert_eq!(next.orphans().len(), 3, "{:?}", next.orphans());
    assert!(
        next.orphans()
            .iter()
            .all(|a| matches!(a.outcome, OrphanOutcome::LeftRunning(_))),
        "{:?}",
        next.orphans()
    );
    drop(next);
    assert!(
        alive(decoy.pid()),
        "dropping a supervisor never touches the decoy"
    );
}

/// Ignore: reported and left running; a later instance with Kill still finds and stops it
/// (the ledger of the dead instance keeps it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ignored_orphans_stay_and_a_later_supervisor_still_finds_them() {
    let dir = SdkDir::new("orphan-ignore");
    let id = format!("test-orphan-ignore-{}", std::process::id());
    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);
    let ignoring = Supervisor::builder()
        .id(&id)
        .orphan_policy(OrphanPolicy::Ignore)
        .build()
        .await
        .unwrap();
    assert!(
        matches!(outcome_of(ignoring.orphans(), orphan), OrphanOutcome::LeftRunning(why) if why.contains("Ignore")),
        "{:?}",
        ignoring.orphans()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(orphan));
    let report = ignoring.stop_all(StopMode::Force).await;
    assert!(report.succeeded.is_empty(), "{report:?}");
    drop(ignoring);
    assert!(
        alive(orphan),
        "an ignored orphan is not the supervisor's to stop"
    );

    let killing = Supervisor::builder()
        .id(&id)
        .orphan_stop_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    assert!(
        matches!(
            outcome_of(killing.orphans(), orphan),
            OrphanOutcome::Stopped | OrphanOutcome::Killed
        ),
        "{:?}",
        killing.orphans()
    );
    wait_for("the orphan to be gone", T, || !alive(orphan)).await;
}

/// A supervisor alive in another process: its producers are left alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_of_a_live_supervisor_in_another_process_are_left_alone() {
    let dir = SdkDir::new("orphan-live-proc");
    let id = format!("test-orphan-live-proc-{}", std::process::id());
    let (helper, producer) = spawn_dying_supervisor(&id, &dir);
    let sup = Supervisor::builder().id(&id).build().await.unwrap();
    let helper_pid = helper.child.as_ref().map(Child::id);
    match sup.orphans() {
        [action] => {
            assert_eq!(action.pid, producer);
            assert_eq!(action.supervisor_pid, helper_pid);
            assert!(
                matches!(&action.outcome, OrphanOutcome::LeftRunning(why) if why.contains("still running")),
                "{action:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(producer));
    drop(sup);
    assert!(alive(producer));
    drop(helper);
}

/// A group in which one member dropped the marker (`env -u …`): only the marked members are
/// signalled, one by one; the unmarked one is left alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_mixed_group_only_the_marked_members_are_signalled() {
    let dir = SdkDir::new("orphan-mixed");
    let id = format!("test-orphan-mixed-{}", std::process::id());
    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    dir.command("orphaned-cam", "unmarked");
    let unmarked = {
        let deadline = std::time::Instant::now() + T;
        loop {
            let found = group_members(orphan).into_iter().find(|&p| {
                p != orphan
                    && std::fs::read_to_string(format!("/proc/{p}/cmdline"))
                        .is_ok_and(|c| c.starts_with("sleep\u{0}300"))
            });
            if let Some(p) = found {
                break p;
            }
            assert!(std::time::Instant::now() < deadline, "no unmarked member");
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    assert!(!environ(unmarked).contains_key("KVS_FRAMES_SUPERVISOR_ID"));
    crash(&mut helper);
    let sup = Supervisor::builder()
        .id(&id)
        .orphan_stop_timeout(Duration::from_secs(3))
        .build()
        .await
        .unwrap();
    assert!(
        matches!(
            outcome_of(sup.orphans(), orphan),
            OrphanOutcome::Stopped | OrphanOutcome::Killed
        ),
        "{:?}",
        sup.orphans()
    );
    wait_for("the marked leader to be gone", T, || !alive(orphan)).await;
    assert!(alive(unmarked), "the unmarked member was signalled");
    // SAFETY: kill(2) on the leftover sleep of this test's producer.
    unsafe {
        libc::kill(i32::try_from(unmarked).unwrap(), libc::SIGKILL);
    }
}

/// Adoptable orphans never claimed are stopped by `stop_all` (and reported), or killed when
/// the supervisor is dropped; one that ends by itself is forgotten.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unclaimed_adoptable_orphans_are_stopped_at_stop_all_or_drop() {
    let dir = SdkDir::new("orphan-unclaimed");
    let id = format!("test-orphan-unclaimed-{}", std::process::id());
    let adopt = || {
        Supervisor::builder()
            .id(&id)
            .orphan_policy(OrphanPolicy::Adopt)
            .orphan_stop_timeout(Duration::from_secs(2))
            .stats_interval(Duration::from_millis(100))
            .build()
    };

    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);
    let sup = adopt().await.unwrap();
    assert_eq!(outcome_of(sup.orphans(), orphan), &OrphanOutcome::Adopted);
    let report = sup.stop_all(StopMode::Graceful).await;
    assert!(report.is_success(), "{:?}", report.error_messages());
    assert_eq!(
        report.succeeded,
        [format!("orphaned-cam (unclaimed orphan pid {orphan})")]
    );
    wait_for("the unclaimed orphan to be gone", T, || !alive(orphan)).await;
    drop(sup);

    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);
    let sup = adopt().await.unwrap();
    assert_eq!(outcome_of(sup.orphans(), orphan), &OrphanOutcome::Adopted);
    drop(sup);
    wait_for("the unclaimed orphan to be killed at drop", T, || {
        !alive(orphan)
    })
    .await;

    let (mut helper, orphan) = spawn_dying_supervisor(&id, &dir);
    crash(&mut helper);
    let sup = adopt().await.unwrap();
    assert_eq!(outcome_of(sup.orphans(), orphan), &OrphanOutcome::Adopted);
    // It ends by itself: forgotten (pruned), never signalled later.
    // SAFETY: kill(2) on the orphan's own group.
    unsafe {
        libc::kill(-i32::try_from(orphan).unwrap(), libc::SIGKILL);
    }
    wait_for("the orphan to end", T, || !alive(orphan)).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let report = sup.stop_all(StopMode::Graceful).await;
    assert!(report.succeeded.is_empty(), "{report:?}");
    assert!(report.is_success());
}

/// A supervisor in another PID namespace (a container) with the same id and state directory:
/// its producers, visible here, are not ours — left alone and reported as such.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn producers_of_another_pid_namespace_are_not_ours() {
    let dir = SdkDir::new("orphan-pidns");
    let id = format!("test-orphan-pidns-{}", std::process::id());
    // A state directory of this test's own: the namespace's ledger goes with it.
    let state = dir.root.join("state");
    let (helper, _inner_pid) = spawn_helper_in(
        &id,
        &dir,
        &["unshare", "--pid", "--fork", "--mount-proc", "--kill-child"],
        Some(&state),
    );
    let host_pid = {
        let deadline = std::time::Instant::now() + T;
        loop {
            if let [pid] = leaders_of(&id, "orphaned-cam")[..] {
                break pid;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "no producer in the namespace"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let sup = Supervisor::builder()
        .id(&id)
        .state_dir(&state)
        .orphan_stop_timeout(Duration::from_secs(1))
        .build()
        .await
        .unwrap();
    assert!(
        matches!(outcome_of(sup.orphans(), host_pid), OrphanOutcome::LeftRunning(why) if why.contains("another PID namespace")),
        "{:?}",
        sup.orphans()
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(alive(host_pid));
    drop(sup);
    drop(helper);
}
