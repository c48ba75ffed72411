//! Helpers shared by the producer supervision tests: the fake `kvs_gstreamer_sample` script,
//! temporary directories, fast restart policies and process checks through `/proc`.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use kvs_frames::producer::{
    KvsGstreamerSample, ProducerEvent, ProducerSpec, RestartPolicy, StartLimit, Supervisor,
};
use tokio::sync::broadcast;

/// The camera URL the fake producers get; its password must never show.
pub const SECRET_URL: &str = "rtsp://admin:hunter2@127.0.0.1:8554/Streaming/Channels/101";
pub const PASSWORD: &str = "hunter2";

pub fn fake_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/scripts/fake_kvs_producer.sh")
}

/// A directory laid out like the producer SDK: `build/` (the working directory) and
/// `kvs_log_configuration` beside it. Removed on drop.
pub struct SdkDir {
    pub root: PathBuf,
}

impl SdkDir {
    pub fn new(tag: &str) -> Self {
        let root = std::env::temp_dir().join(format!(
            "kvs-frames-producer-{tag}-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::create_dir_all(root.join("build")).expect("temp dir");
        std::fs::write(
            root.join("kvs_log_configuration"),
            "log4cplus.rootLogger=DEBUG\n",
        )
        .expect("log configuration");
        SdkDir { root }
    }

    pub fn build_dir(&self) -> PathBuf {
        self.root.join("build")
    }

    /// The control file of producer `name`.
    pub fn control(&self, name: &str) -> PathBuf {
        self.root.join(format!("control-{name}"))
    }

    /// Tells producer `name` what to do next (`exit0`, `hang`, `flood`, …), atomically.
    pub fn command(&self, name: &str, command: &str) {
        let tmp = self.root.join(format!(".control-{name}.tmp"));
        std::fs::write(&tmp, format!("{command}\n")).expect("write command");
        std::fs::rename(&tmp, self.control(name)).expect("publish command");
    }
}

impl Drop for SdkDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.root);
    }
}

fn rand_suffix() -> u64 {
    use std::time::{SystemTime, UNIX_EPOCH};
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()))
}

/// Fast restarts for tests: 100 ms doubling to 400 ms, no jitter, a generous start limit.
pub fn fast_policy() -> RestartPolicy {
    RestartPolicy::default()
        .initial_delay(Duration::from_millis(100))
        .max_delay(Duration::from_millis(400))
        .jitter(1.0, 1.0)
        .start_limit(Some(StartLimit {
            burst: 50,
            interval: Duration::from_secs(60),
        }))
}

/// A `KvsGstreamerSample` producer running the fake script, with short timeouts.
pub fn fake_spec(name: &str, dir: &SdkDir) -> ProducerSpec {
    ProducerSpec::new(
        name,
        SECRET_URL,
        KvsGstreamerSample::new()
            .binary(fake_script())
            .working_dir(dir.build_dir()),
    )
    .env("FAKE_CONTROL", dir.control(name).to_string_lossy())
    .start_secs(Duration::from_secs(5))
    .stall_timeout(Some(Duration::from_secs(2)))
    .stop_timeout(Duration::from_secs(2))
    .restart_policy(fast_policy())
}

/// A supervisor with an id unique to this test process (tests run in parallel processes and
/// each finds only its own orphans).
pub async fn supervisor(tag: &str) -> Supervisor {
    Supervisor::builder()
        .id(format!("test-{tag}-{}", std::process::id()))
        .stats_interval(Duration::from_millis(200))
        .jitter_seed(7)
        .build()
        .await
        .expect("supervisor builds")
}

/// Alive: in /proc and not a zombie.
pub fn alive(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rfind(')')
                .and_then(|i| stat[i + 1..].split_whitespace().next().map(str::to_owned));
            !matches!(state.as_deref(), Some("Z" | "X"))
        }
        Err(_) => false,
    }
}

/// Gone from /proc entirely: dead and reaped (not a zombie).
pub fn reaped(pid: u32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
}

/// The pids of the live processes in process group `pgid`.
pub fn group_members(pgid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some(close) = stat.rfind(')') else {
            continue;
        };
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        if fields.first().is_some_and(|s| *s != "Z") && fields.get(2) == Some(&&*pgid.to_string()) {
            out.push(pid);
        }
    }
    out
}

pub async fn wait_for(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + timeout;
    while !condition() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The next event that satisfies `pred`.
pub async fn next_event(
    rx: &mut broadcast::Receiver<ProducerEvent>,
    timeout: Duration,
    pred: impl Fn(&ProducerEvent) -> bool,
) -> ProducerEvent {
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Ok(Ok(ev)) if pred(&ev) => return ev,
            Ok(Ok(_)) | Ok(Err(broadcast::error::RecvError::Lagged(_))) => {}
            Ok(Err(e)) => panic!("event channel: {e}"),
            Err(_) => panic!("no matching event within {timeout:?}"),
        }
    }
}
