//! Retention of clip files: deletes the clips (and thumbnails) older than a limit.
//!
//! [`sweep`] walks a directory tree and deletes every regular file with a clip extension
//! (`mp4`, `jpg` by default) whose modification time is older than `now − max_age`. It never
//! follows symbolic links and skips hidden entries, except the hidden work directories that
//! [`ClipExtractor`](crate::kvs::ClipExtractor) leaves behind when its process is killed
//! mid-clip (`.*.kvs-clip-tmp`), which are removed once older than the limit. A file that cannot
//! be deleted is reported in [`SweepReport::errors`] and the sweep goes on. Directories are
//! kept, even when they become empty.
//!
//! The functions are synchronous (file system calls); from async code run them with
//! `tokio::task::spawn_blocking`.
//!
//! ```no_run
//! use std::time::Duration;
//!
//! # fn main() -> kvs_frames::Result<()> {
//! // What would go? Nothing is deleted on a dry run.
//! let report = kvs_frames::retention::sweep("out/live", Duration::from_secs(24 * 3600), true)?;
//! for path in &report.deleted {
//!     tracing::info!("would delete {}", path.display());
//! }
//! tracing::info!("{} files, {} bytes older than {:?}", report.deleted.len(), report.deleted_bytes, report.cutoff);
//! # Ok(()) }
//! ```

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use crate::error::{Error, Result};
use crate::kvs::clips::WORK_DIR_SUFFIX;

/// The extensions [`sweep`] treats as clip files.
pub const DEFAULT_EXTENSIONS: [&str; 2] = ["mp4", "jpg"];

/// Options of [`sweep_with`].
#[derive(Clone, Debug)]
pub struct SweepOptions {
    max_age: Duration,
    dry_run: bool,
    extensions: Vec<String>,
}

impl SweepOptions {
    /// Delete clip files older than `max_age`, for real, with the [`DEFAULT_EXTENSIONS`].
    #[must_use]
    pub fn new(max_age: Duration) -> Self {
        SweepOptions {
            max_age,
            dry_run: false,
            extensions: DEFAULT_EXTENSIONS.iter().map(|e| (*e).to_owned()).collect(),
        }
    }

    /// Only report what would be deleted (default false).
    #[must_use]
    pub fn dry_run(mut self, dry_run: bool) -> Self {
        self.dry_run = dry_run;
        self
    }

    /// The file extensions (without the dot, compared ASCII case-insensitively) of clip files.
    #[must_use]
    pub fn extensions<I, S>(mut self, extensions: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        self.extensions = extensions.into_iter().map(Into::into).collect();
        self
    }
}

/// A file or directory the sweep could not read or delete.
#[derive(Clone, Debug)]
pub struct SweepError {
    /// The file or directory.
    pub path: PathBuf,
    /// What failed.
    pub error: Error,
}

/// What a sweep did (or, on a dry run, would do).
#[non_exhaustive]
#[derive(Clone, Debug)]
pub struct SweepReport {
    /// Files modified before this time are deleted: `now − max_age`.
    pub cutoff: SystemTime,
    /// Whether this was a dry run (then nothing was deleted).
    pub dry_run: bool,
    /// The clip files deleted (on a dry run: that would be deleted), in walk order.
    pub deleted: Vec<PathBuf>,
    /// Their total size in bytes.
    pub deleted_bytes: u64,
    /// Stale work directories of interrupted clips removed (or that would be).
    pub work_dirs_removed: Vec<PathBuf>,
    /// Clip files younger than the cutoff, kept.
    pub kept: usize,
    /// What could not be read or deleted; the sweep went on.
    pub errors: Vec<SweepError>,
}

impl SweepReport {
    /// How many clip files were deleted (or would be).
    #[must_use]
    pub fn deleted_count(&self) -> usize {
        self.deleted.len()
    }
}

/// Deletes the clip files (`*.mp4`, `*.jpg`) under `dir` modified more than `max_age` ago; with
/// `dry_run`, deletes nothing and reports what it would delete.
///
/// Fails only when `dir` itself cannot be read; every other failure is in
/// [`SweepReport::errors`].
pub fn sweep(dir: impl AsRef<Path>, max_age: Duration, dry_run: bool) -> Result<SweepReport> {
    sweep_with(dir, &SweepOptions::new(max_age).dry_run(dry_run))
}

/// [`sweep`] with every option.
pub fn sweep_with(dir: impl AsRef<Path>, options: &SweepOptions) -> Result<SweepReport> {
    let dir = dir.as_ref();
    let cutoff = SystemTime::now()
        .checked_sub(options.max_age)
        .unwrap_or(SystemTime::UNIX_EPOCH);
    let mut report = SweepReport {
        cutoff,
        dry_run: options.dry_run,
        deleted: Vec::new(),
        deleted_bytes: 0,
        work_dirs_removed: Vec::new(),
        kept: 0,
        errors: Vec::new(),
    };
    let root = std::fs::read_dir(dir)
        .map_err(|e| Error::from(e).context(format!("retention sweep of {}", dir.display())))?;
    let mut pending = vec![(dir.to_path_buf(), Some(root))];
    while let Some((path, entries)) = pending.pop() {
        let entries = match entries {
            Some(entries) => entries,
            None => match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) => {
                    report.error(&path, e);
                    continue;
                }
            },
        };
        for entry in entries {
            let entry = match entry {
                Ok(entry) => entry,
                Err(e) => {
                    report.error(&path, e);
                    continue;
                }
            };
            let entry_path = entry.path();
            let file_type = match entry.file_type() {
                Ok(t) => t,
                Err(e) => {
                    report.error(&entry_path, e);
                    continue;
                }
            };
            let name = entry.file_name();
            let name = name.to_string_lossy();
            let hidden = name.starts_with('.');
            if file_type.is_dir() {
                if !hidden {
                    pending.push((entry_path, None));
                } else if name.ends_with(WORK_DIR_SUFFIX) {
                    report.stale_work_dir(&entry_path, options.dry_run);
                }
            } else if file_type.is_file() && !hidden && options.is_clip(&entry_path) {
                report.file(&entry_path, options.dry_run);
            }
        }
    }
    tracing::debug!(
        dir = %dir.display(),
        dry_run = options.dry_run,
        deleted = report.deleted.len(),
        bytes = report.deleted_bytes,
        kept = report.kept,
        errors = report.errors.len(),
        "retention sweep"
    );
    Ok(report)
}

impl SweepOptions {
    fn is_clip(&self, path: &Path) -> bool {
        path.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|ext| self.extensions.iter().any(|e| e.eq_ignore_ascii_case(ext)))
    }
}

impl SweepReport {
    fn error(&mut self, path: &Path, error: std::io::Error) {
        let error = Error::from(error);
        tracing::warn!(path = %path.display(), error = %error, "retention sweep: cannot process");
        self.errors.push(SweepError {
            path: path.to_path_buf(),
            error,
        });
    }

    fn is_old(&mut self, path: &Path, metadata: &std::fs::Metadata) -> Option<bool> {
        match metadata.modified() {
            Ok(modified) => Some(modified < self.cutoff),
            Err(e) => {
                self.error(path, e);
                None
            }
        }
    }

    fn file(&mut self, path: &Path, dry_run: bool) {
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => return self.error(path, e),
        };
        match self.is_old(path, &metadata) {
            Some(true) => {}
            Some(false) => {
                self.kept += 1;
                return;
            }
            None => return,
        }
        if !dry_run {
            match std::fs::remove_file(path) {
                Ok(()) => {}
                // Gone meanwhile (another sweep): nothing to do, nothing freed by this one.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
                Err(e) => return self.error(path, e),
            }
        }
        self.deleted_bytes += metadata.len();
        self.deleted.push(path.to_path_buf());
    }

    fn stale_work_dir(&mut self, path: &Path, dry_run: bool) {
        let metadata = match std::fs::symlink_metadata(path) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return,
            Err(e) => return self.error(path, e),
        };
        if self.is_old(path, &metadata) != Some(true) {
            return;
        }
        if !dry_run && let Err(e) = std::fs::remove_dir_all(path) {
            if e.kind() != std::io::ErrorKind::NotFound {
                self.error(path, e);
            }
            return;
        }
        self.work_dirs_removed.push(path.to_path_buf());
    }
}
