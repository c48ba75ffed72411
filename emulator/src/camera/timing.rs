//! Frame timing (producer time, PTS, decode time of each frame, in exact integer arithmetic)
//! and the overlay text with the frame's producer time in UTC.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use gstreamer as gst;

/// Frame timing: producer time, PTS and decode time of each frame, all exact integers.
#[derive(Clone, Copy, Debug)]
pub(super) struct Timing {
    /// Producer time of frame 0.
    start: SystemTime,
    /// Frames per second.
    pub(super) fps: u32,
    /// Ticks per second of the decode times.
    pub(super) timescale: u32,
    /// Ticks per frame (`timescale / fps`, exact).
    pub(super) ticks_per_frame: u32,
    /// Decode time of frame 0.
    decode_time_base: u64,
}

impl Timing {
    /// Timing for `fps` frames per second: timescale 90 kHz when it divides evenly, else
    /// `fps * 1000`.
    pub(super) fn new(start: SystemTime, fps: u32, decode_time_base: u64) -> Self {
        let timescale = if 90_000u32.is_multiple_of(fps) {
            90_000
        } else {
            fps * 1000
        };
        Self {
            start,
            fps,
            timescale,
            ticks_per_frame: timescale / fps,
            decode_time_base,
        }
    }

    /// Time of frame `n` after frame 0, in nanoseconds (`n * 1e9 / fps`, rounded down).
    fn offset_ns(&self, n: u64) -> u128 {
        u128::from(n) * 1_000_000_000 / u128::from(self.fps)
    }

    /// Time of frame `n` after frame 0.
    fn offset(&self, n: u64) -> Duration {
        duration_from_ns(self.offset_ns(n))
    }

    /// Producer time of frame `n`.
    pub(super) fn producer_time(&self, n: u64) -> SystemTime {
        self.start + self.offset(n)
    }

    /// Buffer PTS of frame `n`.
    pub(super) fn pts(&self, n: u64) -> gst::ClockTime {
        gst::ClockTime::from_nseconds(u64::try_from(self.offset_ns(n)).unwrap_or(u64::MAX))
    }

    /// Frame number of a buffer with PTS `pts` (the inverse of [`Timing::pts`]).
    pub(super) fn frame_of_pts(&self, pts: gst::ClockTime) -> u64 {
        let n = (u128::from(pts.nseconds()) * u128::from(self.fps) + 500_000_000) / 1_000_000_000;
        u64::try_from(n).unwrap_or(u64::MAX)
    }

    /// Decode time (ticks) of frame `n`.
    pub(super) fn decode_time(&self, n: u64) -> u64 {
        self.decode_time_base + n * u64::from(self.ticks_per_frame)
    }

    /// Duration of `frames` frames.
    pub(super) fn span(&self, frames: u64) -> Duration {
        self.offset(frames)
    }

    /// A nanosecond count converted to ticks, rounded to the nearest tick.
    pub(super) fn ns_to_ticks(&self, ns: i128) -> i128 {
        let scaled = ns * i128::from(self.timescale);
        (scaled + scaled.signum() * 500_000_000) / 1_000_000_000
    }
}

/// A `Duration` of `ns` nanoseconds (saturating far beyond any realistic value).
fn duration_from_ns(ns: u128) -> Duration {
    let secs = u64::try_from(ns / 1_000_000_000).unwrap_or(u64::MAX);
    // The remainder is below 1e9 and fits.
    let nanos = (ns % 1_000_000_000) as u32;
    Duration::new(secs, nanos)
}

/// `time` as UTC with milliseconds, e.g. `2026-11-21T10:00:00.040Z` (times before 1970 show as
/// 1970-01-01).
fn format_utc_millis(time: SystemTime) -> String {
    let since = time.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = since.as_secs();
    let (year, month, day) = civil_from_days(secs / 86_400);
    let rem = secs % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        since.subsec_millis()
    )
}

/// Year, month and day of the proleptic Gregorian calendar `days` days after 1970-01-01
/// (Howard Hinnant's `civil_from_days`).
fn civil_from_days(days: u64) -> (u64, u64, u64) {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    (year, month, day)
}

/// The overlay text of frame `n`: stream name, frame number and producer time.
pub(super) fn label(name: &str, n: u64, time: SystemTime) -> String {
    format!("{name}  #{n:06}  {}", format_utc_millis(time))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Producer times print as UTC with milliseconds, including leap days.
    #[test]
    fn formats_utc_with_milliseconds() {
        let t = UNIX_EPOCH + Duration::from_millis(1_795_255_200_040);
        assert_eq!(format_utc_millis(t), "2026-11-21T10:00:00.040Z");
        assert_eq!(format_utc_millis(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400 + 86_399);
        assert_eq!(format_utc_millis(leap), "2000-02-29T23:59:59.000Z");
        assert_eq!(
            label("cam-1", 123, t),
            "cam-1  #000123  2026-11-21T10:00:00.040Z"
        );
    }

    /// Producer times, PTS and decode times follow from the frame number without drift.
    #[test]
    fn timing_is_exact_integer_arithmetic() {
        let start = UNIX_EPOCH + Duration::from_secs(1_000);
        let t = Timing::new(start, 25, 7);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 3600));
        assert_eq!(t.decode_time(10), 7 + 36_000);
        assert_eq!(t.producer_time(25), start + Duration::from_secs(1));
        let t = Timing::new(start, 7, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (7000, 1000));
        let t = Timing::new(start, 3, 0);
        assert_eq!(
            t.producer_time(3_000_000_000),
            start + Duration::from_secs(1_000_000_000)
        );
        assert_eq!(t.offset(1), Duration::from_nanos(333_333_333));
        for n in [0, 1, 2, 3, 1_000_001, 9_999_999_999] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
        let t = Timing::new(start, 120, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 750));
        for n in [0, 1, 7, 119, 1_234_567] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
    }
}
