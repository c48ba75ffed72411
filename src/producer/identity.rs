//! Who a process is — pid, start time and boot — checked again immediately before every signal
//! the supervisor sends, so that a pid reused by another process is never signalled.
//!
//! The start time (`/proc/<pid>/stat` field 22, clock ticks after boot) tells two processes
//! with the same pid apart within one boot; the boot id (`/proc/sys/kernel/random/boot_id`)
//! tells boots apart; the PID namespace (the inode of `/proc/self/ns/pid`) says which pids a
//! recorded identity refers to at all. Identities read back from a marker or a ledger are only
//! used when their boot id and PID namespace are this process's.

use std::io;
use std::os::unix::fs::MetadataExt;
use std::sync::{Arc, OnceLock};

use super::procfs;

/// The boot id of the running kernel (`/proc/sys/kernel/random/boot_id`), or `"unknown"`.
pub(crate) fn boot_id() -> &'static Arc<str> {
    static BOOT: OnceLock<Arc<str>> = OnceLock::new();
    BOOT.get_or_init(|| {
        std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .ok()
            .map(|s| s.trim().to_owned())
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-'))
            .unwrap_or_else(|| "unknown".to_owned())
            .into()
    })
}

/// The inode of this process's PID namespace (`/proc/self/ns/pid`), or 0 when unknown.
pub(crate) fn pid_namespace() -> u64 {
    static NS: OnceLock<u64> = OnceLock::new();
    *NS.get_or_init(|| {
        std::fs::metadata("/proc/self/ns/pid")
            .map(|m| m.ino())
            .unwrap_or(0)
    })
}

/// Whether `/proc` shows this process's PID namespace (`/proc/self` is our pid): otherwise
/// every pid read from it means another process, and nothing may be signalled by it.
pub(crate) fn proc_shows_own_namespace() -> bool {
    std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse::<u32>().ok())
        == Some(std::process::id())
}

/// A process: pid, start time and boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Identity {
    pub pid: i32,
    pub start_ticks: u64,
    pub boot_id: Arc<str>,
}

/// What [`Identity::check`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Check {
    /// The same process, running.
    Alive,
    /// The same process, ended but not reaped yet: its pid (and its process group) cannot be
    /// reused until it is.
    Zombie,
    /// No such process, or another one with the same pid, or an identity of another boot.
    Gone,
}

impl Identity {
    /// The identity of `pid` now.
    pub fn of(pid: i32) -> io::Result<Identity> {
        let stat = procfs::read_stat(pid)?;
        Ok(Identity {
            pid,
            start_ticks: stat.start_ticks,
            boot_id: boot_id().clone(),
        })
    }

    /// Reads `/proc/<pid>/stat` again.
    pub fn check(&self) -> Check {
        if self.boot_id != *boot_id() {
            return Check::Gone;
        }
        match procfs::read_stat(self.pid) {
            Ok(stat) if stat.start_ticks == self.start_ticks => {
                if stat.is_zombie() {
                    Check::Zombie
                } else {
                    Check::Alive
                }
            }
            _ => Check::Gone,
        }
    }
}

/// Why a signal was not sent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum NotSent {
    /// The process is gone, or its pid now belongs to another process.
    Gone,
    /// pid 0 or 1, or this process or its process group.
    Protected,
    /// `kill(2)` failed.
    Failed(i32),
}

/// Whom a signal reaches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Reach {
    /// The process group led by the process (`kill(-pid)`): only when the leader is alive or
    /// an unreaped zombie, which keeps the group id from being reused.
    Group,
    /// The process alone (and only while it runs).
    Process,
}

/// Sends `signal` to `who` (or its group) after checking, immediately before, that `who` is
/// still the same process. Never signals pid 0 or 1, this process or its process group.
pub(crate) fn signal(who: &Identity, reach: Reach, signal: i32) -> Result<(), NotSent> {
    let pid = who.pid;
    // SAFETY: getpgrp has no preconditions.
    let own_group = unsafe { libc::getpgrp() };
    if pid <= 1 || u32::try_from(pid).ok() == Some(std::process::id()) || pid == own_group {
        return Err(NotSent::Protected);
    }
    match (who.check(), reach) {
        (Check::Alive, _) | (Check::Zombie, Reach::Group) => {}
        (Check::Zombie, Reach::Process) | (Check::Gone, _) => return Err(NotSent::Gone),
    }
    let target = match reach {
        Reach::Group => -pid,
        Reach::Process => pid,
    };
    // SAFETY: kill(2) sends a signal; no memory is involved.
    if unsafe { libc::kill(target, signal) } == 0 {
        Ok(())
    } else {
        let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno == libc::ESRCH {
            Err(NotSent::Gone)
        } else {
            Err(NotSent::Failed(errno))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_identity_and_namespace() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let me = Identity::of(pid).unwrap();
        assert_eq!(me.check(), Check::Alive);
        assert!(proc_shows_own_namespace());
        assert!(pid_namespace() > 0);
        assert_ne!(&**boot_id(), "unknown");
        // Another start time, or another boot: not us.
        let older = Identity {
            start_ticks: me.start_ticks + 1,
            ..me.clone()
        };
        assert_eq!(older.check(), Check::Gone);
        let other_boot = Identity {
            boot_id: "00000000-0000-0000-0000-000000000000".into(),
            ..me.clone()
        };
        assert_eq!(other_boot.check(), Check::Gone);
        // Never ourselves, our group, init or 0.
        assert_eq!(signal(&me, Reach::Process, 0), Err(NotSent::Protected));
        let init = Identity {
            pid: 1,
            ..me.clone()
        };
        assert_eq!(signal(&init, Reach::Group, 0), Err(NotSent::Protected));
    }

    #[test]
    fn a_reused_pid_is_never_signalled() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        let real = Identity::of(pid).unwrap();
        assert_eq!(signal(&real, Reach::Process, 0), Ok(()));
        // The same pid with another start time stands for a process that reused the pid.
        let impostor = Identity {
            start_ticks: real.start_ticks.wrapping_sub(1),
            ..real.clone()
        };
        assert_eq!(
            signal(&impostor, Reach::Process, libc::SIGKILL),
            Err(NotSent::Gone)
        );
        assert_eq!(
            real.check(),
            Check::Alive,
            "the impostor's signal was not sent"
        );
        signal(&real, Reach::Process, libc::SIGKILL).unwrap();
        child.wait().unwrap();
        assert_eq!(real.check(), Check::Gone);
        assert_eq!(
            signal(&real, Reach::Group, libc::SIGKILL),
            Err(NotSent::Gone)
        );
    }
}
