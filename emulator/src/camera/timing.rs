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
    pub(super) rate: crate::FrameRate,
    /// Ticks per second of the decode times.
    pub(super) timescale: u32,
    /// Ticks per frame (`timescale · den / num`, exact).
    pub(super) ticks_per_frame: u32,
    /// Decode time of frame 0.
    decode_time_base: u64,
}

impl Timing {
    /// Timing for `rate` frames per second: timescale 90 kHz when a frame is a whole number of
    /// its ticks (25 fps: 3600; 29.97: 3003), else `num · 1000` (a frame: `den · 1000` ticks).
    pub(super) fn new(start: SystemTime, rate: crate::FrameRate, decode_time_base: u64) -> Self {
        let (num, den) = (rate.num.max(1), rate.den.max(1));
        let (timescale, ticks_per_frame) =
            if (90_000u64 * u64::from(den)).is_multiple_of(u64::from(num)) {
                (
                    90_000,
                    u32::try_from(90_000u64 * u64::from(den) / u64::from(num)).unwrap_or(1),
                )
            } else {
                (num.saturating_mul(1000), den.saturating_mul(1000))
            };
        Self {
            start,
            rate,
            timescale,
            ticks_per_frame,
            decode_time_base,
        }
    }

    /// Time of frame `n` after frame 0, in nanoseconds (`n · den · 1e9 / num`, rounded down).
    fn offset_ns(&self, n: u64) -> u128 {
        self.rate.nanos(n)
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
        let (num, den) = (u128::from(self.rate.num), u128::from(self.rate.den.max(1)));
        let unit = den * 1_000_000_000;
        let n = (u128::from(pts.nseconds()) * num + unit / 2) / unit;
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
        let t = Timing::new(start, crate::FrameRate::integer(25), 7);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 3600));
        assert_eq!(t.decode_time(10), 7 + 36_000);
        assert_eq!(t.producer_time(25), start + Duration::from_secs(1));
        let t = Timing::new(start, crate::FrameRate::integer(7), 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (7000, 1000));
        let t = Timing::new(start, crate::FrameRate::integer(3), 0);
        assert_eq!(
            t.producer_time(3_000_000_000),
            start + Duration::from_secs(1_000_000_000)
        );
        assert_eq!(t.offset(1), Duration::from_nanos(333_333_333));
        for n in [0, 1, 2, 3, 1_000_001, 9_999_999_999] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
        let t = Timing::new(start, crate::FrameRate::integer(120), 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 750));
        for n in [0, 1, 7, 119, 1_234_567] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n);
        }
        // NTSC: 3003 ticks of 90 kHz a frame; after an hour (107,892 frames) exactly
        // 107,892 × 1001 / 30 ms, nothing accumulated.
        let t = Timing::new(start, crate::FrameRate::NTSC, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (90_000, 3003));
        let hour = 107_892u64;
        assert_eq!(
            t.producer_time(hour),
            start + Duration::from_nanos(hour * 1001 * 1_000_000_000 / 30_000)
        );
        assert_eq!(t.decode_time(hour), hour * 3003);
        assert_eq!(t.offset(30), Duration::from_millis(1001));
        for n in [0, 1, 2, 29, 30, 1001, hour, 9_999_999_999] {
            assert_eq!(t.frame_of_pts(t.pts(n)), n, "frame {n}");
        }
        // 15/1.001 has no whole 90 kHz frame step? It has: 6006 ticks.
        let t = Timing::new(
            start,
            crate::FrameRate {
                num: 15_000,
                den: 1001,
            },
            0,
        );
        assert_eq!(t.ticks_per_frame, 6006);
        // A rate 90 kHz cannot hold: num · 1000 ticks a second.
        let t = Timing::new(start, crate::FrameRate { num: 7, den: 3 }, 0);
        assert_eq!((t.timescale, t.ticks_per_frame), (7000, 3000));
    }
}
