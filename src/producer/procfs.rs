//! What the supervisor reads from `/proc`: process groups, CPU time, resident memory, start
//! times and the environment marker of orphaned producers.

use std::collections::HashMap;
use std::io;
use std::path::Path;
use std::sync::OnceLock;

/// The fields of `/proc/<pid>/stat` the supervisor uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ProcStat {
    pub pid: i32,
    pub state: u8,
    pub pgrp: i32,
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    /// Start time after boot, in clock ticks: with the pid, identifies a process across pid
    /// reuse.
    pub start_ticks: u64,
    /// Resident set, in pages.
    pub rss_pages: u64,
}

impl ProcStat {
    /// Alive and not yet reaped.
    pub fn is_zombie(&self) -> bool {
        matches!(self.state, b'Z' | b'X' | b'x')
    }
}

/// Parses `/proc/<pid>/stat`. The command name (field 2) may contain spaces and parentheses,
/// so the fields after it are found from the last `)`.
pub(crate) fn parse_stat(text: &str) -> Option<ProcStat> {
    let open = text.find('(')?;
    let close = text.rfind(')')?;
    let pid = text[..open].trim().parse().ok()?;
    let rest: Vec<&str> = text.get(close + 1..)?.split_ascii_whitespace().collect();
    // rest[0] is field 3 (state).
    let field = |n: usize| rest.get(n - 3).copied();
    let num = |n: usize| field(n).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        pid,
        state: *field(3)?.as_bytes().first()?,
        pgrp: field(5)?.parse().ok()?,
        cpu_ticks: num(14)?.saturating_add(num(15)?),
        start_ticks: num(22)?,
        rss_pages: field(24)?.parse::<i64>().ok()?.max(0).unsigned_abs(),
    })
}

pub(crate) fn read_stat(pid: i32) -> io::Result<ProcStat> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    parse_stat(&text).ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "bad stat"))
}

/// Whether `pid` is a live (not zombie) process that started at `start_ticks` (when given).
pub(crate) fn is_alive(pid: i32, start_ticks: Option<u64>) -> bool {
    match read_stat(pid) {
        Ok(stat) => !stat.is_zombie() && start_ticks.is_none_or(|t| t == stat.start_ticks),
        Err(_) => false,
    }
}

/// The pid of the process that traces `pid` (`TracerPid` in `/proc/<pid>/status`), if any.
pub(crate) fn tracer_pid(pid: i32) -> Option<i32> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("TracerPid:"))
        .and_then(|v| v.trim().parse().ok())
        .filter(|&t| t > 0)
}

/// Every numeric entry of `/proc`.
pub(crate) fn all_pids() -> Vec<i32> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .collect()
}

/// The stat of every live process.
pub(crate) fn all_stats() -> Vec<ProcStat> {
    all_pids()
        .into_iter()
        .filter_map(|pid| read_stat(pid).ok())
        .filter(|s| !s.is_zombie())
        .collect()
}

/// `/proc/<pid>/environ` as `NAME=value` entries (the environment the process was started
/// with). Unreadable (another user's process, gone) → error.
///
/// A process caught in `execve` can show part of its old environment and part of its new one
/// in one read: the environment is read until two consecutive reads agree.
pub(crate) fn environ(pid: i32) -> io::Result<Vec<(String, String)>> {
    let path = Path::new("/proc").join(pid.to_string()).join("environ");
    let mut previous = std::fs::read(&path)?;
    for _ in 0..4 {
        let current = std::fs::read(&path)?;
        if current == previous {
            return Ok(parse_environ(&current));
        }
        previous = current;
    }
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        "the environment keeps changing (process in execve)",
    ))
}

pub(crate) fn parse_environ(bytes: &[u8]) -> Vec<(String, String)> {
    bytes
        .split(|&b| b == 0)
        .filter_map(|entry| {
            let text = std::str::from_utf8(entry).ok()?;
            let (k, v) = text.split_once('=')?;
            Some((k.to_owned(), v.to_owned()))
        })
        .collect()
}

pub(crate) fn clock_ticks_per_second() -> u64 {
    static TICKS: OnceLock<u64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
        u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(100)
    })
}

pub(crate) fn page_size() -> u64 {
    static SIZE: OnceLock<u64> = OnceLock::new();
    *SIZE.get_or_init(|| {
        // SAFETY: sysconf has no preconditions.
        let v = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
        u64::try_from(v).ok().filter(|&v| v > 0).unwrap_or(4096)
    })
}

/// CPU and memory of one process group, from one scan of `/proc`.
#[derive(Clone, Debug, Default)]
pub(crate) struct GroupSample {
    /// CPU ticks per live member.
    pub ticks: HashMap<i32, u64>,
    pub rss_bytes: u64,
}

/// One scan of `/proc`, grouped by the wanted process groups.
pub(crate) fn sample_groups(pgids: &[i32]) -> HashMap<i32, GroupSample> {
    let mut out: HashMap<i32, GroupSample> = HashMap::new();
    if pgids.is_empty() {
        return out;
    }
    let page = page_size();
    for stat in all_stats() {
        if pgids.contains(&stat.pgrp) {
            let g = out.entry(stat.pgrp).or_default();
            g.ticks.insert(stat.pid, stat.cpu_ticks);
            g.rss_bytes = g
                .rss_bytes
                .saturating_add(stat.rss_pages.saturating_mul(page));
        }
    }
    out
}

/// CPU used between two samples of a group, in ticks. A member that appeared since the
/// previous sample counts fully (it started in between); members that left are ignored.
pub(crate) fn cpu_delta_ticks(previous: &HashMap<i32, u64>, current: &HashMap<i32, u64>) -> u64 {
    current
        .iter()
        .map(|(pid, &now)| now.saturating_sub(previous.get(pid).copied().unwrap_or(0)))
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_spaces_and_parens_in_name() {
        let text = "4242 (my (weird) prog) S 1 4242 4242 0 -1 4194560 100 0 0 0 \
                    150 50 0 0 20 0 1 0 987654 12345678 321 18446744073709551615 \
                    1 1 0 0 0 0 0 0 0 0 0 0 17 0 0 0 0 0 0";
        let s = parse_stat(text).unwrap();
        assert_eq!(s.pid, 4242);
        assert_eq!(s.state, b'S');
        assert_eq!(s.pgrp, 4242);
        assert_eq!(s.cpu_ticks, 200);
        assert_eq!(s.start_ticks, 987_654);
        assert_eq!(s.rss_pages, 321);
        assert!(!s.is_zombie());
        assert!(parse_stat("garbage").is_none());
    }

    #[test]
    fn own_process_is_readable() {
        let pid = i32::try_from(std::process::id()).unwrap();
        let s = read_stat(pid).unwrap();
        assert_eq!(s.pid, pid);
        assert!(s.rss_pages > 0);
        assert!(is_alive(pid, Some(s.start_ticks)));
        assert!(!is_alive(pid, Some(s.start_ticks + 1)));
        assert!(all_pids().contains(&pid));
        assert!(clock_ticks_per_second() > 0 && page_size() > 0);
        let env = environ(pid).unwrap();
        assert!(env.iter().any(|(k, _)| k == "PATH") || env.is_empty());
    }

    #[test]
    fn environ_and_cpu_delta() {
        assert_eq!(
            parse_environ(b"A=1\0B=x=y\0junk\0"),
            [("A".into(), "1".into()), ("B".into(), "x=y".into())]
        );
        let prev = HashMap::from([(1, 100), (2, 50)]);
        let cur = HashMap::from([(1, 130), (3, 7)]);
        assert_eq!(cpu_delta_ticks(&prev, &cur), 37);
    }
}
