//! Health: what is wrong with a producer, from its status, restart history and last error,
//! and what to try.

use std::time::{Duration, SystemTime};

use tokio::time::Instant;

use super::status::{ProducerHealth, ProducerState, ProducerStatus, RestartReason};
use super::supervisor::StatusInner;

/// Restarts within this window make a producer "unstable".
const RECENT: Duration = Duration::from_secs(600);
const UNSTABLE_RESTARTS: usize = 3;

fn push_unique(list: &mut Vec<String>, item: String) {
    if !list.contains(&item) {
        list.push(item);
    }
}

/// Recommendations from the text of the last error line.
fn from_error_text(text: &str, recs: &mut Vec<String>) {
    let t = text.to_ascii_lowercase();
    let any = |words: &[&str]| words.iter().any(|w| t.contains(w));
    if any(&["max_fragment_duration", "fragment duration"]) {
        push_unique(
            recs,
            "The camera's key-frame interval (GOP) is too long for KVS (fragments must be \
             shorter than 20 s): set an I-frame interval of 1-4 s on the camera."
                .to_owned(),
        );
    }
    if any(&[
        "notauthorized",
        "accessdenied",
        "access denied",
        "credential",
        "security token",
        "expiredtoken",
        "signature",
    ]) {
        push_unique(
            recs,
            "AWS rejected the producer's credentials: check AWS_ACCESS_KEY_ID / \
             AWS_SECRET_ACCESS_KEY / AWS_SESSION_TOKEN in its environment, the region, and \
             that the IAM policy allows kinesisvideo:PutMedia, DescribeStream, \
             GetDataEndpoint (and CreateStream if the stream may be missing)."
                .to_owned(),
        );
    }
    if any(&[
        "could not connect",
        "connection refused",
        "could not open resource",
        "could not read from resource",
        "unauthorized",
        "401",
        "timeout",
        "timed out",
        "no route to host",
    ]) {
        push_unique(
            recs,
            "The RTSP camera is unreachable or refuses the session: check that it is online, \
             the URL and its credentials, and try TCP transport."
                .to_owned(),
        );
    }
    if any(&[
        "no element",
        "no such element",
        "erroneous pipeline",
        "could not load plugin",
    ]) {
        push_unique(
            recs,
            "A GStreamer element is missing: install the plugin, or add the directory of \
             kvssink (libgstkvssink.so) to GST_PLUGIN_PATH in the producer's environment."
                .to_owned(),
        );
    }
}

fn from_reason(
    reason: RestartReason,
    s: &StatusInner,
    heartbeats_since_activation: u64,
    recs: &mut Vec<String>,
) {
    let rec = match reason {
        RestartReason::Stall if heartbeats_since_activation == 0 => format!(
            "The heartbeat line {:?} has never appeared: check that the producer's log level \
             prints it (kvs_log_configuration must let DEBUG lines through), or configure \
             another heartbeat line or no stall watchdog.",
            s.heartbeat_line.as_deref().unwrap_or("")
        ),
        RestartReason::Stall => "The producer goes silent: the camera probably stops \
             sending (network, camera reboot, UDP loss). Check the camera's network and try \
             TCP transport; a GOP over 20 s also stalls KVS fragments."
            .to_owned(),
        RestartReason::ExitSuccess => "The producer exits with code 0, which \
             kvs_gstreamer_sample does after an RTSP error: check that the camera is reachable \
             and the RTSP URL and credentials are right."
            .to_owned(),
        RestartReason::ExitFailure => "The producer exits with an error code, usually a \
             configuration problem (AWS credentials, region, stream permissions, arguments): \
             see its last output lines."
            .to_owned(),
        RestartReason::Signal => "The producer is killed by a signal nobody in the \
             supervisor sent: check memory limits (the OOM killer) and other tools that \
             signal processes."
            .to_owned(),
        RestartReason::SpawnFailure => "The producer cannot be spawned: check the binary \
             path, its permissions and the working directory."
            .to_owned(),
        RestartReason::Manual => return,
    };
    push_unique(recs, rec);
}

pub(crate) fn assess(
    status: &ProducerStatus,
    s: &StatusInner,
    heartbeats_since_activation: u64,
) -> ProducerHealth {
    let mut issues = Vec::new();
    let mut recs = Vec::new();
    let now = Instant::now();
    match status.state {
        ProducerState::Fatal => {
            issues.push(format!(
                "fatal: {}",
                status.last_error.as_deref().unwrap_or(&status.state_reason)
            ));
            recs.push(
                "Fix the cause shown by the last error and output lines, then call \
                 restart(); raise the start limit if the camera is expected to be offline \
                 for long."
                    .to_owned(),
            );
        }
        ProducerState::Backoff => issues.push(format!("restarting: {}", status.state_reason)),
        ProducerState::Stopped => issues.push(format!("stopped: {}", status.state_reason)),
        ProducerState::Stopping => issues.push(format!("stopping: {}", status.state_reason)),
        ProducerState::Starting => issues.push(format!(
            "starting for {} s",
            status.uptime.unwrap_or_default().as_secs()
        )),
        ProducerState::Unkillable => issues.push(format!("unkillable: {}", status.state_reason)),
        ProducerState::Running => {}
    }
    if !status.unkillable_pids.is_empty() {
        if status.state != ProducerState::Unkillable {
            issues.push(format!(
                "pids {:?} did not end after SIGKILL (still watched)",
                status.unkillable_pids
            ));
        }
        recs.push(
            "A process that survives SIGKILL is stuck in the kernel (D state: a hung NFS \
             mount, a device, a FUSE file system) or held by a debugger or tracer (TracerPid \
             in /proc/PID/status). Free the resource or detach the tracer: the supervisor \
             reaps it as soon as it ends."
                .to_owned(),
        );
    }
    // Heartbeat freshness.
    if status.state == ProducerState::Running
        && !status.adopted
        && let Some(stall) = s.stall_timeout
    {
        let age = status
            .last_heartbeat
            .and_then(|t| SystemTime::now().duration_since(t).ok());
        match age {
            None if status.uptime.unwrap_or_default() > stall / 2 => issues.push(format!(
                "no heartbeat line yet after {} s running",
                status.uptime.unwrap_or_default().as_secs()
            )),
            Some(age) if age > stall / 2 => issues.push(format!(
                "last heartbeat {} s ago (stall timeout {} s)",
                age.as_secs(),
                stall.as_secs()
            )),
            _ => {}
        }
    }
    if status.adopted {
        recs.push(
            "Adopted from an earlier supervisor: its output and heartbeat cannot be watched; \
             restart it when convenient to supervise it fully."
                .to_owned(),
        );
    }
    // Restart history.
    let recent: Vec<RestartReason> = s
        .recent_restarts
        .iter()
        .filter(|(t, r)| now.duration_since(*t) <= RECENT && *r != RestartReason::Manual)
        .map(|(_, r)| *r)
        .collect();
    if recent.len() >= UNSTABLE_RESTARTS {
        let mut counts: Vec<(RestartReason, usize)> = Vec::new();
        for r in &recent {
            match counts.iter_mut().find(|(x, _)| x == r) {
                Some((_, n)) => *n += 1,
                None => counts.push((*r, 1)),
            }
        }
        counts.sort_by_key(|(_, n)| std::cmp::Reverse(*n));
        let summary: Vec<String> = counts.iter().map(|(r, n)| format!("{n} {r}")).collect();
        issues.push(format!(
            "unstable: {} restarts in the last 10 minutes ({})",
            recent.len(),
            summary.join(", ")
        ));
        if let Some((dominant, _)) = counts.first() {
            from_reason(*dominant, s, heartbeats_since_activation, &mut recs);
        }
    } else if matches!(status.state, ProducerState::Backoff | ProducerState::Fatal)
        && let Some((_, reason)) = s.recent_restarts.back()
    {
        from_reason(*reason, s, heartbeats_since_activation, &mut recs);
    }
    if (!matches!(
        status.state,
        ProducerState::Running | ProducerState::Stopped
    ) || recent.len() >= UNSTABLE_RESTARTS)
        && let Some(err) = &status.last_error
    {
        from_error_text(err, &mut recs);
    }
    if let Some(cpu) = status.cpu_percent
        && cpu > 90.0
    {
        issues.push(format!("high CPU: {cpu:.0} % of a core"));
        recs.push(
            "The producer should only repackage H.264: make sure the camera sends H.264 \
             (no transcoding) and the host is not overloaded."
                .to_owned(),
        );
    }
    for warning in &status.warnings {
        issues.push(warning.clone());
    }
    ProducerHealth {
        stream_name: status.stream_name.clone(),
        healthy: status.state == ProducerState::Running && issues.is_empty(),
        state: status.state,
        issues,
        recommendations: recs,
    }
}
