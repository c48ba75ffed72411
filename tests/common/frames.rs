//! Reading frames from any source's iterator in tests.
#![allow(dead_code)]

use std::time::Duration;

/// Takes `n` frames from a source's iterator, failing after `timeout` per frame (`stats`
/// describes the source in the failure message).
pub fn take_frames(
    mut frames: kvs_frames::Frames<'_>,
    n: usize,
    timeout: Duration,
    stats: impl Fn() -> kvs_frames::SourceStats,
) -> Vec<kvs_frames::Frame> {
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        match frames.next_timeout(timeout) {
            Some(Ok((frame, ts))) => {
                assert_eq!(ts, frame.timestamp());
                out.push(frame);
            }
            Some(Err(e)) => panic!("error after {} frames: {e}", out.len()),
            None => panic!(
                "no frame within {timeout:?} after {} frames; stats {:?}",
                out.len(),
                stats()
            ),
        }
    }
    out
}

/// Every frame until the iterator *ends*: failing on an error, and on `timeout` without an item
/// while the source still says Connected (a stall is not an end).
pub fn drain_frames(
    mut frames: kvs_frames::Frames<'_>,
    timeout: Duration,
    stats: impl Fn() -> kvs_frames::SourceStats,
) -> Vec<kvs_frames::Frame> {
    let mut out = Vec::new();
    loop {
        match frames.next_timeout(timeout) {
            Some(Ok((frame, _))) => out.push(frame),
            Some(Err(e)) => panic!("error after {} frames: {e}", out.len()),
            None => {
                let stats = stats();
                assert!(
                    !matches!(
                        stats.state,
                        kvs_frames::SourceState::Connected | kvs_frames::SourceState::Error
                    ),
                    "no end after {} frames: {stats:?}",
                    out.len()
                );
                return out;
            }
        }
    }
}
