//! Orphans across supervisor instances: a supervisor process dies (SIGKILL) and leaves its
//! producer running; the next instance with the same id finds it through /proc and kills or
//! adopts it. The dying supervisor is this test binary run again as a helper process.

mod producer_support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kvs_frames::producer::{OrphanOutcome, OrphanPolicy, ProducerState, StopMode, Supervisor};
use producer_support::*;

const T: Duration = Duration::from_secs(20);
const HELPER_ID: &str = "KVS_FRAMES_TEST_ORPHAN_HELPER_ID";
const HELPER_DIR: &str = "KVS_FRAMES_TEST_ORPHAN_HELPER_DIR";

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
        let sup = Supervisor::builder().id(id).build().await.unwrap();
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
    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new(exe)
        .args([
            "orphan_helper",
            "--exact",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(HELPER_ID, id)
        .env(HELPER_DIR, &dir.root)
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

    // A third instance finds nothing left.
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
