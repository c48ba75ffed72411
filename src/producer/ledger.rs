//! The ledger: a file per supervisor instance, in the state directory, that records every
//! process the instance started (pid, start time, stream, marker). A later instance treats a
//! process as an orphan of its id only when a ledger of a dead instance of that id records
//! exactly that process: a process that merely carries the same command line or environment
//! (a copy of the marker) is never taken for one.
//!
//! Files are small JSON documents replaced atomically (written beside, then renamed). The
//! directory must belong to the supervisor's user and be writable by it alone.

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

/// The version of the file format.
const VERSION: u32 = 1;

/// One process an instance started (or adopted).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct LedgerEntry {
    pub pid: i32,
    pub start_ticks: u64,
    pub stream: String,
    /// The `KVS_FRAMES_SUPERVISOR_INSTANCE` value in the process's environment.
    pub marker: String,
}

/// The content of one instance's file.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(crate) struct LedgerDoc {
    pub version: u32,
    pub id: String,
    /// The instance that keeps these processes (`pid.start.nonce.boot.pidns`).
    pub instance: String,
    pub children: Vec<LedgerEntry>,
}

/// The state directory used when none is set: `$XDG_RUNTIME_DIR/kvs-frames`, else
/// `/run/kvs-frames` for root, else `<temp dir>/kvs-frames-<uid>`.
pub(crate) fn default_state_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_RUNTIME_DIR").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("kvs-frames");
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if euid == 0 {
        PathBuf::from("/run/kvs-frames")
    } else {
        std::env::temp_dir().join(format!("kvs-frames-{euid}"))
    }
}

/// Creates `dir` (mode 0700) if needed and checks that it is a directory (not a symlink) owned
/// by this user and not writable by others. Returns why not.
pub(crate) fn prepare_dir(dir: &Path) -> std::result::Result<(), String> {
    if let Err(e) = std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
    {
        return Err(format!("cannot create it: {e}"));
    }
    let meta = std::fs::symlink_metadata(dir).map_err(|e| format!("cannot read it: {e}"))?;
    if !meta.is_dir() {
        return Err("not a directory (symbolic links are refused)".to_owned());
    }
    // SAFETY: geteuid has no preconditions.
    let euid = unsafe { libc::geteuid() };
    if meta.uid() != euid {
        return Err(format!(
            "owned by uid {}, not by this user (uid {euid})",
            meta.uid()
        ));
    }
    if meta.mode() & 0o022 != 0 {
        return Err(format!(
            "writable by group or others (mode {:o}): use a directory only this user can write",
            meta.mode() & 0o7777
        ));
    }
    Ok(())
}

fn safe(text: &str) -> String {
    text.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

fn file_name(instance: &str) -> String {
    format!("instance-{}.json", safe(instance))
}

/// Writes `doc` to `path` atomically, or removes the file when `doc` has no children.
pub(crate) fn write(path: &Path, doc: &LedgerDoc) -> io::Result<()> {
    if doc.children.is_empty() {
        return match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        };
    }
    // A name of our own: two supervisors may rewrite the same dead instance's ledger.
    static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let tmp = path.with_extension(format!("json.{}-{n}.tmp", std::process::id()));
    let text = serde_json::to_vec_pretty(doc).map_err(io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, path)
}

/// The ledgers of other instances of supervisor `id` in `dir`, with their paths.
pub(crate) fn read_others(dir: &Path, id: &str, own: &Path) -> Vec<(PathBuf, LedgerDoc)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in entries.flatten() {
        let path = entry.path();
        let is_ledger = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with("instance-") && n.ends_with(".json"));
        if !is_ledger || path == own {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        match serde_json::from_slice::<LedgerDoc>(&text) {
            Ok(doc) if doc.version == VERSION && doc.id == id => out.push((path, doc)),
            Ok(_) => {}
            Err(e) => tracing::warn!(path = %path.display(), "unreadable supervisor ledger: {e}"),
        }
    }
    out
}

/// The ledger of this instance.
pub(crate) struct Ledger {
    path: PathBuf,
    doc: Mutex<LedgerDoc>,
    warned: AtomicBool,
}

impl Ledger {
    pub fn new(dir: &Path, id: &str, instance: &str) -> Self {
        Ledger {
            path: dir.join(file_name(instance)),
            doc: Mutex::new(LedgerDoc {
                version: VERSION,
                id: id.to_owned(),
                instance: instance.to_owned(),
                children: Vec::new(),
            }),
            warned: AtomicBool::new(false),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn save(&self, doc: &LedgerDoc) {
        if let Err(e) = write(&self.path, doc)
            && !self.warned.swap(true, Ordering::SeqCst)
        {
            tracing::warn!(
                path = %self.path.display(),
                "cannot write the supervisor ledger ({e}): a later supervisor will not find \
                 this one's producers if it dies"
            );
        }
    }

    /// Records a process (replacing an entry with the same pid).
    pub fn add(&self, entry: LedgerEntry) {
        let mut doc = self.doc.lock();
        doc.children.retain(|e| e.pid != entry.pid);
        doc.children.push(entry);
        self.save(&doc);
    }

    /// Forgets a process.
    pub fn remove(&self, pid: i32, start_ticks: u64) {
        let mut doc = self.doc.lock();
        let before = doc.children.len();
        doc.children
            .retain(|e| !(e.pid == pid && e.start_ticks == start_ticks));
        if doc.children.len() != before {
            self.save(&doc);
        }
    }

    #[cfg(test)]
    pub fn entries(&self) -> Vec<LedgerEntry> {
        self.doc.lock().children.clone()
    }
}

/// An exclusive lock on the orphan decisions of every supervisor using `dir` (`flock` on the
/// directory), tried for at most `wait`. `None` when it cannot be had: orphans are then
/// handled without it. It is held only while the ledgers are read and adopted processes move
/// to their new keeper, never while processes are being stopped.
pub(crate) fn lock(dir: &Path, wait: Duration) -> Option<File> {
    let file = File::open(dir).ok()?;
    let deadline = std::time::Instant::now() + wait;
    loop {
        // SAFETY: flock on a file descriptor we own.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
            return Some(file);
        }
        if std::time::Instant::now() >= deadline {
            tracing::warn!(dir = %dir.display(), "orphan lock busy: handling orphans without it");
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Removes the ledgers in `dir` (of any supervisor id) that record no process still running:
/// their instance is dead (`is_dead`) and every entry is gone (`is_gone`).
pub(crate) fn collect_garbage(
    dir: &Path,
    is_dead: impl Fn(&str) -> bool,
    is_gone: impl Fn(&LedgerEntry) -> bool,
) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("instance-") && name.ends_with(".json")) {
            continue;
        }
        let Ok(text) = std::fs::read(&path) else {
            continue;
        };
        let Ok(doc) = serde_json::from_slice::<LedgerDoc>(&text) else {
            continue;
        };
        if is_dead(&doc.instance) && doc.children.iter().all(&is_gone) {
            let _ = std::fs::remove_file(&path);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn temp(tag: &str) -> PathBuf {
        let dir =
            std::env::temp_dir().join(format!("kvs-frames-ledger-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        dir
    }

    #[test]
    fn entries_round_trip_and_empty_ledgers_vanish() {
        let dir = temp("rt");
        prepare_dir(&dir).unwrap();
        let ledger = Ledger::new(&dir, "svc", "1.2.3.boot.4");
        let entry = LedgerEntry {
            pid: 42,
            start_ticks: 7,
            stream: "cam".into(),
            marker: "1.2.3.boot.4".into(),
        };
        ledger.add(entry.clone());
        assert!(ledger.path().exists());
        let others = read_others(&dir, "svc", Path::new("/nonexistent"));
        assert_eq!(others.len(), 1);
        assert_eq!(others[0].1.children, std::slice::from_ref(&entry));
        assert_eq!(others[0].1.instance, "1.2.3.boot.4");
        assert!(read_others(&dir, "other-id", Path::new("/x")).is_empty());
        assert!(read_others(&dir, "svc", ledger.path()).is_empty());
        ledger.remove(42, 8); // another start time: not this entry
        assert_eq!(ledger.entries().len(), 1);
        ledger.remove(42, 7);
        assert!(!ledger.path().exists());
        let held = lock(&dir, Duration::from_millis(10));
        assert!(held.is_some());
        // Bounded: a second locker gives up.
        assert!(lock(&dir, Duration::from_millis(50)).is_none());
        drop(held);
        ledger.add(entry);
        collect_garbage(&dir, |_| false, |_| true);
        assert!(ledger.path().exists(), "a live instance keeps its ledger");
        collect_garbage(&dir, |_| true, |_| false);
        assert!(ledger.path().exists(), "a running process keeps the ledger");
        collect_garbage(&dir, |_| true, |_| true);
        assert!(!ledger.path().exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn unsafe_state_dirs_are_refused() {
        let dir = temp("perm");
        prepare_dir(&dir).unwrap();
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(
            prepare_dir(&dir)
                .unwrap_err()
                .contains("writable by group or others")
        );
        let link = temp("link");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(prepare_dir(&link).unwrap_err().contains("symbolic"));
        let _ = std::fs::remove_file(&link);
        let _ = std::fs::remove_dir_all(&dir);
        assert!(
            default_state_dir().ends_with("kvs-frames")
                || default_state_dir()
                    .to_string_lossy()
                    .contains("kvs-frames-")
        );
    }
}
