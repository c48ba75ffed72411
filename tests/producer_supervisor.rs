//! Producer supervision against real child processes: a script that behaves like
//! `kvs_gstreamer_sample` (its lines, exit codes, hangs, ignored signals, floods).

mod producer_support;

use std::time::Duration;

use kvs_frames::ErrorKind;
use kvs_frames::producer::{
    ExitKind, KvsGstreamerSample, ProducerSpec, ProducerState, RestartReason, StartLimit, StopMode,
    Supervisor,
};
use producer_support::*;

const T: Duration = Duration::from_secs(20);

fn restarts(status: &kvs_frames::producer::ProducerStatus, reason: RestartReason) -> u64 {
    status
        .restarts_by_reason
        .iter()
        .find(|(r, _)| *r == reason)
        .map_or(0, |(_, n)| *n)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reaches_running_reports_status_and_metrics_and_stops_gracefully() {
    let dir = SdkDir::new("running");
    let registry = kvs_frames::prometheus::Registry::new();
    let sup = Supervisor::builder()
        .id(format!("test-running-{}", std::process::id()))
        .stats_interval(Duration::from_millis(200))
        .metrics_registry(&registry)
        .build()
        .await
        .unwrap();
    let mut events = sup.events();
    let status = sup.start(fake_spec("cam-1", &dir)).await.unwrap();
    assert_eq!(status.kind, "kvs_gstreamer_sample");
    let pid = status.pid.expect("pid");
    assert!(alive(pid));
    assert!(matches!(
        status.state,
        ProducerState::Starting | ProducerState::Running
    ));

    // Starting → Running on the readiness line, long before start_secs (5 s).
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Running).await;
    assert_eq!(ev.from, ProducerState::Starting);
    assert_eq!(ev.reason, "printed its readiness line");
    assert_eq!(ev.pid, Some(pid));

    // CPU and memory come from /proc, the heartbeat from the ack lines.
    let status = sup
        .wait_until("cam-1", T, |s| {
            s.cpu_percent.is_some() && s.rss_bytes.is_some() && s.last_heartbeat.is_some()
        })
        .await
        .unwrap();
    assert!(status.rss_bytes.unwrap() > 100_000, "{status:?}");
    assert!(status.uptime.unwrap() > Duration::ZERO);
    assert!(status.started_at.is_some());
    assert_eq!(status.restarts, 0);
    assert_eq!(
        status.rtsp_url,
        "rtsp://admin:***@127.0.0.1:8554/Streaming/Channels/101"
    );
    assert!(!format!("{status:?}").contains(PASSWORD));
    assert!(status.warnings.is_empty(), "{:?}", status.warnings);
    let health = sup.health("cam-1").unwrap();
    assert!(health.healthy, "{health:?}");

    // The output is kept, redacted.
    let output = sup.output("cam-1").unwrap();
    assert!(
        output.iter().any(|l| l
            .text
            .contains("Streaming from rtsp source rtsp://admin:***@127.0.0.1")),
        "{output:?}"
    );
    assert!(output.iter().all(|l| !l.text.contains(PASSWORD)));

    // Metrics in the caller's registry.
    let text = { kvs_frames::metrics::encode_text(&registry).unwrap() };
    for needle in [
        "kvs_producer_state{stream=\"cam-1\"} 2",
        "kvs_producer_restarts_total{reason=\"stall\",stream=\"cam-1\"} 0",
        "kvs_producer_uptime_seconds{stream=\"cam-1\"}",
        "kvs_producer_cpu_percent{stream=\"cam-1\"}",
        "kvs_producer_resident_memory_bytes{stream=\"cam-1\"}",
        "kvs_producer_last_heartbeat_timestamp_seconds{stream=\"cam-1\"}",
    ] {
        assert!(text.contains(needle), "missing {needle} in\n{text}");
    }

    // Graceful stop: SIGINT to the group; the script dies of it; the child is reaped.
    let status = sup.stop("cam-1", StopMode::Graceful).await.unwrap();
    assert_eq!(status.state, ProducerState::Stopped);
    assert_eq!(status.pid, None);
    let exit = status.last_exit.unwrap();
    assert!(exit.requested);
    assert_eq!(exit.pid, pid);
    assert_eq!(exit.kind, ExitKind::Signal(libc::SIGINT));
    assert!(reaped(pid), "pid {pid} is still in /proc (zombie?)");
    wait_for("the group to be gone", T, || group_members(pid).is_empty()).await;
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Stopping).await;
    assert!(ev.reason.contains("SIGINT"), "{ev:?}");
    next_event(&mut events, T, |e| e.to == ProducerState::Stopped).await;
    // Stopping again is a no-op.
    assert_eq!(
        sup.stop("cam-1", StopMode::Graceful).await.unwrap().state,
        ProducerState::Stopped
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarts_after_exit_0_and_exit_1() {
    let dir = SdkDir::new("exits");
    let sup = supervisor("exits").await;
    let mut events = sup.events();
    let first = sup.start(fake_spec("cam-1", &dir)).await.unwrap();
    sup.wait_for_state("cam-1", ProducerState::Running, T)
        .await
        .unwrap();
    let pid1 = first.pid.unwrap();

    // Exit 0, as kvs_gstreamer_sample does after an RTSP error: still a restart.
    dir.command("cam-1", "exit0");
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Backoff).await;
    assert_eq!(ev.restart_reason, Some(RestartReason::ExitSuccess));
    assert!(ev.reason.contains("exited with code 0"), "{}", ev.reason);
    // The last error line printed (stdout and stderr are read concurrently: either one).
    assert!(ev.reason.contains("; last error line: "), "{}", ev.reason);
    let s = sup
        .wait_until("cam-1", T, |s| {
            s.state == ProducerState::Running && s.pid.is_some_and(|p| p != pid1)
        })
        .await
        .unwrap();
    assert_eq!(restarts(&s, RestartReason::ExitSuccess), 1);
    let exit = s.last_exit.unwrap();
    assert_eq!(exit.kind, ExitKind::Code(0));
    assert!(!exit.requested);
    assert!(reaped(pid1));
    let pid2 = s.pid.unwrap();

    dir.command("cam-1", "exit1");
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Backoff).await;
    assert_eq!(ev.restart_reason, Some(RestartReason::ExitFailure));
    let s = sup
        .wait_until("cam-1", T, |s| {
            s.state == ProducerState::Running && s.pid.is_some_and(|p| p != pid2)
        })
        .await
        .unwrap();
    assert_eq!(restarts(&s, RestartReason::ExitFailure), 1);
    assert_eq!(s.restarts, 2);
    assert_eq!(s.last_exit.unwrap().kind, ExitKind::Code(1));
    assert_eq!(
        s.last_error.as_deref(),
        Some("[ERROR] fatal producer error")
    );
    assert!(reaped(pid2));
    let report = sup.stop_all(StopMode::Graceful).await;
    assert!(report.is_success(), "{:?}", report.error_messages());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stall_watchdog_restarts_a_silent_producer() {
    let dir = SdkDir::new("stall");
    let sup = supervisor("stall").await;
    let mut events = sup.events();
    let pid1 = sup
        .start(fake_spec("cam-1", &dir))
        .await
        .unwrap()
        .pid
        .unwrap();
    sup.wait_for_state("cam-1", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("cam-1", "hang"); // alive, silent
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Stopping).await;
    assert_eq!(ev.restart_reason, Some(RestartReason::Stall));
    assert!(ev.reason.contains("no heartbeat line"), "{}", ev.reason);
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Backoff).await;
    assert_eq!(ev.restart_reason, Some(RestartReason::Stall));
    let s = sup
        .wait_until("cam-1", T, |s| {
            s.state == ProducerState::Running && s.pid.is_some_and(|p| p != pid1)
        })
        .await
        .unwrap();
    assert_eq!(restarts(&s, RestartReason::Stall), 1);
    // A stall stop is requested by the supervisor: SIGINT killed the hanging script.
    let exit = s.last_exit.unwrap();
    assert!(exit.requested);
    assert_eq!(exit.kind, ExitKind::Signal(libc::SIGINT));
    assert!(reaped(pid1));
    wait_for("the hang loop's sleep to go too", T, || {
        group_members(pid1).is_empty()
    })
    .await;
    // The new process heartbeats again.
    sup.wait_until("cam-1", T, |s| s.last_heartbeat.is_some())
        .await
        .unwrap();
    sup.stop_all(StopMode::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_after_stop_timeout_when_sigint_is_ignored_and_force_stop() {
    let dir = SdkDir::new("sigint");
    let sup = supervisor("sigint").await;
    let mut events = sup.events();
    let pid = sup
        .start(fake_spec("stubborn", &dir).stop_timeout(Duration::from_millis(1500)))
        .await
        .unwrap()
        .pid
        .unwrap();
    sup.wait_for_state("stubborn", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("stubborn", "ignore-int");
    wait_for("the script to ignore SIGINT", T, || {
        sup.output("stubborn")
            .unwrap()
            .iter()
            .any(|l| l.text.contains("ignoring SIGINT"))
    })
    .await;
    let status = sup.stop("stubborn", StopMode::Graceful).await.unwrap();
    assert_eq!(status.state, ProducerState::Stopped);
    let exit = status.last_exit.unwrap();
    assert_eq!(exit.kind, ExitKind::Signal(libc::SIGKILL), "{exit:?}");
    assert!(reaped(pid));
    wait_for("the group to be gone", T, || group_members(pid).is_empty()).await;
    next_event(&mut events, T, |e| e.to == ProducerState::Stopped).await;

    // Force: SIGKILL at once, no stop timeout.
    let spec = fake_spec("forced", &dir).stop_timeout(Duration::from_secs(600));
    let pid = sup.start(spec).await.unwrap().pid.unwrap();
    sup.wait_for_state("forced", ProducerState::Running, T)
        .await
        .unwrap();
    let status = sup.stop("forced", StopMode::Force).await.unwrap();
    assert_eq!(
        status.last_exit.unwrap().kind,
        ExitKind::Signal(libc::SIGKILL)
    );
    assert!(reaped(pid));

    // A force stop escalates a graceful stop in progress.
    let spec = fake_spec("escalated", &dir).stop_timeout(Duration::from_secs(600));
    let pid = sup.start(spec).await.unwrap().pid.unwrap();
    sup.wait_for_state("escalated", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("escalated", "ignore-int");
    wait_for("the script to ignore SIGINT", T, || {
        sup.output("escalated")
            .unwrap()
            .iter()
            .any(|l| l.text.contains("ignoring SIGINT"))
    })
    .await;
    let graceful = {
        let sup = sup.clone();
        tokio::spawn(async move { sup.stop("escalated", StopMode::Graceful).await })
    };
    sup.wait_for_state("escalated", ProducerState::Stopping, T)
        .await
        .unwrap();
    let forced = sup.stop("escalated", StopMode::Force).await.unwrap();
    assert_eq!(forced.state, ProducerState::Stopped);
    assert_eq!(
        forced.last_exit.unwrap().kind,
        ExitKind::Signal(libc::SIGKILL)
    );
    assert_eq!(
        graceful.await.unwrap().unwrap().state,
        ProducerState::Stopped
    );
    assert!(reaped(pid));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flood_of_output_never_blocks_the_producer() {
    let dir = SdkDir::new("flood");
    let sup = supervisor("flood").await;
    // A generous stall timeout: the flood must not look like a stall.
    let spec = fake_spec("noisy", &dir)
        .stall_timeout(Some(Duration::from_secs(60)))
        .output_lines(50);
    sup.start(spec).await.unwrap();
    sup.wait_for_state("noisy", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("noisy", "flood");
    // 100 000 lines of 200 bytes and a 1 MB line: the script only gets to "flood done" if the
    // supervisor keeps reading, and acks follow.
    wait_for("the flood to end", Duration::from_secs(60), || {
        let out = sup.output("noisy").unwrap();
        let done = out.iter().position(|l| l.text == "flood done");
        done.is_some_and(|i| {
            out[i..]
                .iter()
                .any(|l| l.text.contains("Reporting fragment ack"))
        })
    })
    .await;
    let out = sup.output("noisy").unwrap();
    assert!(out.len() <= 50);
    // The 1 MB line without a newline break was cut, not buffered whole.
    let long = out
        .iter()
        .find(|l| l.text.starts_with("LLLL"))
        .expect("the 1 MB line");
    assert_eq!(long.text.len(), 4096);
    let status = sup.status("noisy").unwrap();
    assert_eq!(status.state, ProducerState::Running);
    assert_eq!(status.restarts, 0);
    sup.stop_all(StopMode::Graceful).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fatal_after_the_start_rate_limit_and_manual_restart() {
    let dir = SdkDir::new("fatal");
    let sup = supervisor("fatal").await;
    let mut events = sup.events();
    let spec = fake_spec("broken", &dir)
        .env("FAKE_START", "fail")
        .restart_policy(fast_policy().start_limit(Some(StartLimit {
            burst: 3,
            interval: Duration::from_secs(60),
        })));
    // The spawn itself succeeds: start() returns; the failures come after.
    sup.start(spec).await.unwrap();
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Fatal).await;
    assert!(
        ev.reason
            .starts_with("gave up after 3 failed starts within 60 s"),
        "{}",
        ev.reason
    );
    let s = sup.status("broken").unwrap();
    assert_eq!(s.state, ProducerState::Fatal);
    assert_eq!(s.pid, None);
    // Three failed starts, two restarts: the third failure is not followed by a restart.
    assert_eq!(s.restarts, 2);
    assert_eq!(restarts(&s, RestartReason::ExitFailure), 2);
    assert_eq!(s.failed_starts, 3);
    assert_eq!(s.last_exit.unwrap().kind, ExitKind::Code(1));
    let last_error = s.last_error.unwrap();
    assert!(last_error.contains("gave up"), "{last_error}");
    assert!(
        last_error.contains("NotAuthorizedException"),
        "{last_error}"
    );

    let health = sup.health("broken").unwrap();
    assert!(!health.healthy);
    assert!(health.issues[0].starts_with("fatal: "), "{health:?}");
    assert!(
        health
            .recommendations
            .iter()
            .any(|r| r.contains("AWS rejected the producer's credentials")),
        "{health:?}"
    );

    // Stop on a Fatal producer is a no-op; restart() tries again from a clean window.
    assert_eq!(
        sup.stop("broken", StopMode::Graceful).await.unwrap().state,
        ProducerState::Fatal
    );
    sup.restart("broken").await.unwrap();
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Fatal).await;
    assert!(ev.reason.contains("3 failed starts"));
    let s = sup.status("broken").unwrap();
    assert_eq!(restarts(&s, RestartReason::Manual), 1);
    assert_eq!(s.restarts, 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cpu_and_memory_of_the_process_group() {
    let dir = SdkDir::new("cpu");
    let sup = supervisor("cpu").await;
    let pid = sup
        .start(fake_spec("busy", &dir))
        .await
        .unwrap()
        .pid
        .unwrap();
    sup.wait_for_state("busy", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("busy", "burn"); // a busy loop in a child of the script, same group
    let s = match sup
        .wait_until("busy", Duration::from_secs(30), |s| {
            s.cpu_percent.is_some_and(|c| c > 5.0)
        })
        .await
    {
        Ok(s) => s,
        Err(e) => panic!(
            "{e}\n{:?}\nmembers {:?}\n{:?}",
            sup.status("busy"),
            group_members(pid),
            sup.output("busy")
                .unwrap()
                .iter()
                .rev()
                .take(5)
                .collect::<Vec<_>>()
        ),
    };
    assert!(s.rss_bytes.unwrap() > 1_000_000, "{s:?}");
    assert!(group_members(pid).len() >= 2);
    sup.stop("busy", StopMode::Graceful).await.unwrap();
    // The whole group went, the busy loop included.
    wait_for("the group to be gone", T, || group_members(pid).is_empty()).await;
    let s = sup.status("busy").unwrap();
    assert_eq!((s.cpu_percent, s.rss_bytes), (None, None));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_or_non_executable_binary_is_an_error_at_start() {
    let dir = SdkDir::new("binary");
    let sup = supervisor("binary").await;
    let spec = ProducerSpec::new(
        "cam-1",
        SECRET_URL,
        KvsGstreamerSample::new()
            .binary("/nonexistent/kvs_gstreamer_sample")
            .working_dir(dir.build_dir()),
    );
    let err = sup.start(spec).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert_eq!(err.invalid_option(), Some("binary"));
    assert!(err.to_string().contains("no such file"), "{err}");
    assert!(err.to_string().starts_with("producer cam-1: "), "{err}");
    assert!(
        sup.status("cam-1").is_none(),
        "nothing registered, no crash loop"
    );

    let not_exec = dir.root.join("kvs_gstreamer_sample");
    std::fs::write(&not_exec, "#!/bin/sh\n").unwrap();
    let spec = ProducerSpec::new(
        "cam-1",
        SECRET_URL,
        KvsGstreamerSample::new()
            .binary(&not_exec)
            .working_dir(dir.build_dir()),
    );
    let err = sup.start(spec).await.unwrap_err();
    assert!(err.to_string().contains("not an executable file"), "{err}");
    assert!(!format!("{err:?}").contains(PASSWORD));

    // Without ../kvs_log_configuration the producer starts with a warning in its status.
    let bare = dir.root.join("elsewhere/bare");
    std::fs::create_dir_all(&bare).unwrap();
    let spec = ProducerSpec::new(
        "cam-2",
        SECRET_URL,
        KvsGstreamerSample::new()
            .binary(fake_script())
            .working_dir(&bare),
    );
    let s = sup.start(spec).await.unwrap();
    assert_eq!(s.warnings.len(), 1, "{:?}", s.warnings);
    assert!(s.warnings[0].contains("kvs_log_configuration"));
    let health = sup.health("cam-2").unwrap();
    assert!(
        health
            .issues
            .iter()
            .any(|i| i.contains("kvs_log_configuration"))
    );
    sup.stop_all(StopMode::Force).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_start_stop_duplicates_restart_and_remove() {
    let dir = SdkDir::new("bulk");
    let sup = supervisor("bulk").await;
    let report = sup
        .start_all(vec![
            fake_spec("cam-a", &dir),
            fake_spec("cam-b", &dir),
            fake_spec("bad name!", &dir),
        ])
        .await;
    assert_eq!(report.succeeded, ["cam-a", "cam-b"]);
    assert_eq!(report.failed.len(), 1);
    assert_eq!(report.failed[0].stream_name, "bad name!");
    assert_eq!(report.failed[0].error.invalid_option(), Some("stream_name"));
    assert!(!report.is_success());
    assert!(report.error_messages()[0].starts_with("bad name!: "));

    let err = sup.start(fake_spec("cam-a", &dir)).await.unwrap_err();
    assert_eq!(err.kind(), ErrorKind::AlreadyExists);

    let names: Vec<String> = sup.list().into_iter().map(|s| s.stream_name).collect();
    assert_eq!(names, ["cam-a", "cam-b"]);
    for name in ["cam-a", "cam-b"] {
        sup.wait_for_state(name, ProducerState::Running, T)
            .await
            .unwrap();
    }
    let pids: Vec<u32> = sup.list().iter().filter_map(|s| s.pid).collect();

    // Manual restart: a new process at once, counted, no backoff.
    let old = sup.status("cam-a").unwrap().pid.unwrap();
    let s = sup.restart("cam-a").await.unwrap();
    assert_ne!(s.pid, Some(old));
    assert_eq!(restarts(&s, RestartReason::Manual), 1);
    assert!(reaped(old));

    let report = sup.stop_all(StopMode::Graceful).await;
    assert_eq!(report.succeeded, ["cam-a", "cam-b"]);
    assert!(sup.list().iter().all(|s| s.state == ProducerState::Stopped));
    for pid in pids {
        assert!(reaped(pid));
    }
    // A stopped producer can be restarted (with its spec) or started again.
    let s = sup.restart("cam-b").await.unwrap();
    assert!(s.pid.is_some());
    sup.start(fake_spec("cam-a", &dir)).await.unwrap();
    assert_eq!(
        sup.stop("nope", StopMode::Graceful)
            .await
            .unwrap_err()
            .kind(),
        ErrorKind::InvalidConfig
    );
    sup.remove("cam-b", StopMode::Force).await.unwrap();
    assert!(sup.status("cam-b").is_none());
    assert_eq!(sup.list().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_during_backoff() {
    let dir = SdkDir::new("backoff");
    let sup = supervisor("backoff").await;
    let spec = fake_spec("cam-1", &dir).restart_policy(
        fast_policy()
            .initial_delay(Duration::from_secs(30))
            .max_delay(Duration::from_secs(30)),
    );
    sup.start(spec).await.unwrap();
    sup.wait_for_state("cam-1", ProducerState::Running, T)
        .await
        .unwrap();
    dir.command("cam-1", "exit1");
    let s = sup
        .wait_for_state("cam-1", ProducerState::Backoff, T)
        .await
        .unwrap();
    assert!(s.next_start_in.unwrap() > Duration::from_secs(20));
    assert_eq!(s.consecutive_restarts, 1);
    let s = sup.stop("cam-1", StopMode::Graceful).await.unwrap();
    assert_eq!(s.state, ProducerState::Stopped);
    assert_eq!(s.state_reason, "stopped by request during backoff");
    // A restart during backoff starts at once.
    sup.restart("cam-1").await.unwrap();
    dir.command("cam-1", "exit1");
    sup.wait_for_state("cam-1", ProducerState::Backoff, T)
        .await
        .unwrap();
    let s = sup.restart("cam-1").await.unwrap();
    assert!(s.pid.is_some());
    assert!(matches!(
        s.state,
        ProducerState::Starting | ProducerState::Running
    ));
    sup.stop_all(StopMode::Force).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_supervisor_kills_and_reaps_every_child() {
    let dir = SdkDir::new("drop");
    let sup = supervisor("drop").await;
    let mut pids = Vec::new();
    for name in ["cam-a", "cam-b"] {
        pids.push(sup.start(fake_spec(name, &dir)).await.unwrap().pid.unwrap());
        sup.wait_for_state(name, ProducerState::Running, T)
            .await
            .unwrap();
    }
    dir.command("cam-a", "burn"); // a grandchild in the group
    wait_for("the busy loop", T, || group_members(pids[0]).len() >= 2).await;
    let clone = sup.clone();
    drop(sup);
    // A clone keeps it alive.
    assert!(pids.iter().all(|p| alive(*p)));
    drop(clone);
    wait_for("every child to be killed and reaped", T, || {
        pids.iter()
            .all(|p| reaped(*p) && group_members(*p).is_empty())
    })
    .await;
}

const TRACEE_ENV: &str = "KVS_FRAMES_TEST_TRACEE";

/// Run only as a helper process (see `Tracer::attach`): attaches to the pid in
/// `KVS_FRAMES_TEST_TRACEE` with `PTRACE_SEIZE`, stops it with `PTRACE_INTERRUPT`, prints
/// `TRACING`, and never waits for it: once killed, the tracee stays a zombie that only this
/// tracer may collect, so its real parent (the supervisor) cannot reap it.
#[test]
#[ignore = "helper process of the unkillable test"]
fn tracer_helper() {
    let Ok(pid) = std::env::var(TRACEE_ENV) else {
        return;
    };
    let pid: libc::pid_t = pid.parse().unwrap();
    let null = std::ptr::null_mut::<libc::c_void>();
    // SAFETY: ptrace(2) on a pid, with no memory passed.
    unsafe {
        assert_eq!(
            libc::ptrace(libc::PTRACE_SEIZE, pid, null, null),
            0,
            "PTRACE_SEIZE {pid}: {} (the test needs CAP_SYS_PTRACE or ptrace_scope 0)",
            std::io::Error::last_os_error()
        );
        assert_eq!(libc::ptrace(libc::PTRACE_INTERRUPT, pid, null, null), 0);
    }
    println!("TRACING {pid}");
    std::thread::sleep(Duration::from_secs(120));
}

/// A helper process tracing one pid; killed (which releases the tracee) on drop.
struct Tracer(Option<std::process::Child>);

impl Tracer {
    fn attach(pid: u32) -> Tracer {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "tracer_helper",
                "--exact",
                "--ignored",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(TRACEE_ENV, pid.to_string())
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::inherit())
            .spawn()
            .unwrap();
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stdout)
                .lines()
                .map_while(Result::ok)
            {
                if line.contains("TRACING ") {
                    let _ = tx.send(());
                }
            }
        });
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the tracer attached");
        Tracer(Some(child))
    }

    fn release(&mut self) {
        if let Some(mut child) = self.0.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Tracer {
    fn drop(&mut self) {
        self.release();
    }
}

/// A child that cannot be reaped after SIGKILL (it is traced by another process, which never
/// collects it — as a process stuck in the kernel is never collected): `stop()` returns in
/// bounded time with the producer Unkillable, and the supervisor reaps it once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_child_not_reaped_after_sigkill_is_reported_unkillable_in_bounded_time() {
    let dir = SdkDir::new("unkillable");
    let sup = Supervisor::builder()
        .id(format!("test-unkillable-{}", std::process::id()))
        .kill_timeout(Duration::from_secs(1))
        .stats_interval(Duration::from_millis(200))
        .build()
        .await
        .unwrap();
    let mut events = sup.events();
    let spec = fake_spec("stuck", &dir).stop_timeout(Duration::from_millis(500));
    let pid = sup.start(spec).await.unwrap().pid.unwrap();
    sup.wait_for_state("stuck", ProducerState::Running, T)
        .await
        .unwrap();
    let mut tracer = Tracer::attach(pid);

    let asked = std::time::Instant::now();
    let status = sup.stop("stuck", StopMode::Graceful).await.unwrap();
    let took = asked.elapsed();
    eprintln!("stop of the unreapable child took {took:?}");
    // stop_timeout 0.5 s + 2 × kill_timeout 1 s + 2 s for the readers, with a margin.
    assert!(took < Duration::from_secs(10), "stop took {took:?}");
    assert!(took >= Duration::from_millis(1400), "stop took {took:?}");
    assert_eq!(status.state, ProducerState::Unkillable, "{status:?}");
    assert!(
        status.state_reason.contains(&format!("pid {pid} ")),
        "{}",
        status.state_reason
    );
    assert!(
        status.state_reason.contains("traced by pid"),
        "{}",
        status.state_reason
    );
    assert_eq!(status.unkillable_pids, [pid]);
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Unkillable).await;
    assert_eq!(ev.from, ProducerState::Stopping);
    assert_eq!(ev.pid, Some(pid));
    let health = sup.health("stuck").unwrap();
    assert!(
        health.issues.iter().any(|i| i.starts_with("unkillable: ")),
        "{health:?}"
    );
    assert!(
        health.recommendations.iter().any(|r| r.contains("tracer")),
        "{health:?}"
    );
    // The supervisor moved on: the producer can be started again at once.
    let again = sup.restart("stuck").await.unwrap();
    assert_ne!(again.pid, Some(pid));
    assert!(again.state.is_active());

    // Once the tracer lets go, the zombie is reaped and leaves the list.
    assert!(!reaped(pid), "still a zombie while traced");
    tracer.release();
    sup.wait_until("stuck", T, |s| s.unkillable_pids.is_empty())
        .await
        .unwrap();
    wait_for("the zombie to be reaped", T, || reaped(pid)).await;

    // The same when the process ends by itself (here SIGKILL from outside, as the OOM killer
    // would) while traced: reported unkillable, then restarted as usual.
    sup.wait_for_state("stuck", ProducerState::Running, T)
        .await
        .unwrap();
    let pid2 = sup.status("stuck").unwrap().pid.unwrap();
    let _tracer = Tracer::attach(pid2);
    // SAFETY: kill(2) on the producer we just started.
    unsafe {
        libc::kill(i32::try_from(pid2).unwrap(), libc::SIGKILL);
    }
    let ev = next_event(&mut events, T, |e| {
        e.to == ProducerState::Unkillable && e.pid == Some(pid2)
    })
    .await;
    assert!(ev.reason.contains("could not be reaped"), "{}", ev.reason);
    let s = sup
        .wait_until("stuck", T, |s| {
            s.state == ProducerState::Running && s.pid.is_some_and(|p| p != pid2)
        })
        .await
        .unwrap();
    assert_eq!(s.unkillable_pids, [pid2]);
    let report = sup.stop_all(StopMode::Force).await;
    assert!(report.is_success(), "{:?}", report.error_messages());
}

/// A producer whose stdout is block-buffered (the real sample's, when piped) writes in
/// 4096-byte bursts; its first line puts the URL password right before byte 4096, so a cut
/// before redaction (the old order) showed it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn block_buffered_output_in_4k_bursts_with_a_password_across_the_cut() {
    let dir = SdkDir::new("burst");
    let sup = supervisor("burst").await;
    let spec = fake_spec("bursty", &dir)
        .env("FAKE_BURST", "1")
        .env("FAKE_STRADDLE", "1")
        .env("FAKE_ACK_INTERVAL", "0.01")
        .stall_timeout(Some(Duration::from_secs(10)));
    sup.start(spec).await.unwrap();
    let s = sup
        .wait_for_state("bursty", ProducerState::Running, T)
        .await
        .unwrap();
    assert_eq!(s.state_reason, "printed its readiness line");
    let s = sup
        .wait_until("bursty", T, |s| s.last_heartbeat.is_some())
        .await
        .unwrap();
    assert_eq!(s.restarts, 0);
    let output = sup.output("bursty").unwrap();
    let long = output
        .iter()
        .find(|l| l.text.starts_with("xxxx"))
        .expect("the long line");
    let userinfo = "rtsp://admin:hunter2".len();
    assert_eq!(long.text.len(), 4096);
    assert_eq!(
        long.text,
        format!("{}rtsp://admin:***@127", "x".repeat(4096 - userinfo))
    );
    for line in &output {
        assert!(!line.text.contains("hunt"), "{line:?}");
    }
    assert!(
        output
            .iter()
            .any(|l| l.text.contains("Reporting fragment ack"))
    );
    sup.stop_all(StopMode::Graceful).await;
}

/// `Duration::MAX` ("wait forever") in any option is a typed error naming the option and its
/// value, never a panic; the largest allowed values run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duration_max_options_are_errors_never_panics() {
    let max = Duration::MAX;
    let builders = [
        (
            Supervisor::builder().orphan_stop_timeout(max),
            "orphan_stop_timeout",
        ),
        (Supervisor::builder().kill_timeout(max), "kill_timeout"),
        (Supervisor::builder().stats_interval(max), "stats_interval"),
        (
            Supervisor::builder().event_capacity(usize::MAX),
            "event_capacity",
        ),
    ];
    for (builder, option) in builders {
        let err = builder.build().await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert_eq!(err.invalid_option(), Some(option), "{err}");
    }
    let dir = SdkDir::new("durations");
    let sup = supervisor("durations").await;
    let policy = || fast_policy();
    let specs = [
        (fake_spec("cam-1", &dir).start_secs(max), "start_secs"),
        (
            fake_spec("cam-1", &dir).stall_timeout(Some(max)),
            "stall_timeout",
        ),
        (fake_spec("cam-1", &dir).stop_timeout(max), "stop_timeout"),
        (
            fake_spec("cam-1", &dir).restart_policy(policy().stable_after(max)),
            "restart.stable_after",
        ),
        (
            fake_spec("cam-1", &dir).restart_policy(policy().max_delay(max)),
            "restart.max_delay",
        ),
        (
            fake_spec("cam-1", &dir).restart_policy(policy().initial_delay(max).max_delay(max)),
            "restart.max_delay",
        ),
        (
            fake_spec("cam-1", &dir).restart_policy(policy().start_limit(Some(StartLimit {
                burst: 1,
                interval: max,
            }))),
            "restart.start_limit",
        ),
    ];
    for (spec, option) in specs {
        let err = sup.start(spec).await.unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert_eq!(err.invalid_option(), Some(option), "{err}");
        assert!(err.to_string().contains("18446744073709551615"), "{err}");
        assert!(sup.status("cam-1").is_none());
    }
    // The largest allowed values: started, Running on its readiness line, stopped at once.
    let spec = fake_spec("cam-1", &dir)
        .start_secs(kvs_frames::producer::MAX_START_STOP)
        .stop_timeout(kvs_frames::producer::MAX_START_STOP)
        .stall_timeout(Some(kvs_frames::producer::MAX_PERIOD))
        .restart_policy(
            policy()
                .stable_after(kvs_frames::producer::MAX_PERIOD)
                .max_delay(kvs_frames::producer::MAX_PERIOD),
        );
    sup.start(spec).await.unwrap();
    let s = sup
        .wait_until("cam-1", max, |s| s.state == ProducerState::Running)
        .await
        .unwrap();
    assert_eq!(s.state_reason, "printed its readiness line");
    let s = sup.stop("cam-1", StopMode::Graceful).await.unwrap();
    assert_eq!(s.state, ProducerState::Stopped);
    let big = Supervisor::builder()
        .id(format!("test-durations-max-{}", std::process::id()))
        .orphan_stop_timeout(kvs_frames::producer::MAX_START_STOP)
        .kill_timeout(kvs_frames::producer::MAX_KILL_TIMEOUT)
        .stats_interval(Duration::from_secs(3600))
        .event_capacity(kvs_frames::producer::MAX_EVENT_CAPACITY)
        .build()
        .await;
    assert!(big.is_ok(), "{big:?}");
}

/// The binary is deleted while the producer runs: the next start fails to spawn, is retried
/// with backoff and ends Fatal with an error naming the path; nothing panics or hangs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_binary_deleted_between_restarts_ends_fatal_with_the_spawn_error() {
    let dir = SdkDir::new("deleted");
    let copy = dir.root.join("kvs_gstreamer_sample");
    std::fs::copy(fake_script(), &copy).unwrap();
    let sup = supervisor("deleted").await;
    let mut events = sup.events();
    let spec = ProducerSpec::new(
        "cam-1",
        SECRET_URL,
        KvsGstreamerSample::new()
            .binary(&copy)
            .working_dir(dir.build_dir()),
    )
    .env("FAKE_CONTROL", dir.control("cam-1").to_string_lossy())
    .start_secs(Duration::from_secs(5))
    .stall_timeout(Some(Duration::from_secs(5)))
    .restart_policy(fast_policy().start_limit(Some(StartLimit {
        burst: 3,
        interval: Duration::from_secs(60),
    })));
    sup.start(spec).await.unwrap();
    sup.wait_for_state("cam-1", ProducerState::Running, T)
        .await
        .unwrap();
    std::fs::remove_file(&copy).unwrap();
    dir.command("cam-1", "exit1");
    let ev = next_event(&mut events, T, |e| e.to == ProducerState::Fatal).await;
    assert_eq!(ev.restart_reason, Some(RestartReason::SpawnFailure));
    let s = sup.status("cam-1").unwrap();
    assert_eq!(restarts(&s, RestartReason::SpawnFailure), 2);
    let last_error = s.last_error.unwrap();
    assert!(
        last_error.contains(&copy.display().to_string()),
        "{last_error}"
    );
    assert!(!last_error.contains(PASSWORD));
}
