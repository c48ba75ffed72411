//! The few ISO-BMFF facts the reader needs: the track timescale of an init segment, and the
//! `tfdt` decode times of a media fragment, which it rebases onto its own timeline.
//!
//! Why rebase: KVS does not document the epoch of `tfdt`, it may differ between sessions, and
//! the reader keeps one decode pipeline across session refreshes. Setting each fragment's decode
//! time to (its program date time − the source's first program date time) gives GStreamer one
//! monotonic timeline in which a frame's PTS *is* its producer-time offset, so
//! producer time = epoch + PTS for every frame.

use crate::error::{Error, ErrorKind, Result};

fn protocol(message: impl Into<String>) -> Error {
    Error::new(ErrorKind::Protocol, message)
}

/// Iterates the boxes in `data`: (type, header length, whole box range).
fn boxes(
    data: &[u8],
) -> impl Iterator<Item = Result<([u8; 4], usize, std::ops::Range<usize>)>> + '_ {
    let mut pos = 0usize;
    std::iter::from_fn(move || {
        if pos >= data.len() {
            return None;
        }
        let rest = &data[pos..];
        if rest.len() < 8 {
            pos = data.len();
            return Some(Err(protocol("truncated MP4 box header")));
        }
        let size32 = u32::from_be_bytes([rest[0], rest[1], rest[2], rest[3]]);
        let kind = [rest[4], rest[5], rest[6], rest[7]];
        let (size, header) = match size32 {
            0 => (rest.len(), 8),
            1 => {
                if rest.len() < 16 {
                    pos = data.len();
                    return Some(Err(protocol("truncated 64-bit MP4 box header")));
                }
                let mut b = [0u8; 8];
                b.copy_from_slice(&rest[8..16]);
                (
                    usize::try_from(u64::from_be_bytes(b)).unwrap_or(usize::MAX),
                    16,
                )
            }
            n => (n as usize, 8),
        };
        if size < header || size > rest.len() {
            pos = data.len();
            return Some(Err(protocol(format!(
                "MP4 box {} has size {size}, {} bytes left",
                String::from_utf8_lossy(&kind),
                rest.len()
            ))));
        }
        let range = pos..pos + size;
        pos += size;
        Some(Ok((kind, header, range)))
    })
}

fn child<'a>(data: &'a [u8], path: &[&[u8; 4]]) -> Result<Option<&'a [u8]>> {
    let Some((first, rest)) = path.split_first() else {
        return Ok(Some(data));
    };
    for b in boxes(data) {
        let (kind, header, range) = b?;
        if &kind == *first {
            return child(&data[range.start + header..range.end], rest);
        }
    }
    Ok(None)
}

/// The media timescale (ticks per second) of the first track of an init segment.
pub(crate) fn init_timescale(init: &[u8]) -> Result<u32> {
    let mdhd = child(init, &[b"moov", b"trak", b"mdia", b"mdhd"])?
        .ok_or_else(|| protocol("the init segment has no moov/trak/mdia/mdhd"))?;
    // version(1) flags(3), then v0: ctime(4) mtime(4) timescale(4); v1: ctime(8) mtime(8) timescale(4)
    let at = match mdhd.first() {
        Some(0) => 12,
        Some(1) => 20,
        _ => return Err(protocol("unknown mdhd version")),
    };
    let bytes = mdhd
        .get(at..at + 4)
        .ok_or_else(|| protocol("truncated mdhd"))?;
    let timescale = u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
    if timescale == 0 {
        return Err(protocol("the init segment has timescale 0"));
    }
    Ok(timescale)
}

/// Sets the decode time of a media fragment's first `moof` to `new_time` (ticks) and shifts the
/// `tfdt` of every further `moof` by the same amount. Returns the original first decode time.
pub(crate) fn rebase(fragment: &mut [u8], new_time: u64) -> Result<u64> {
    // Collect the positions of every tfdt (absolute offset of its full-box body, version).
    let mut tfdts: Vec<(usize, u8)> = Vec::new();
    let mut moof_positions = Vec::new();
    for b in boxes(fragment) {
        let (kind, header, range) = b?;
        if &kind == b"moof" {
            moof_positions.push((range.start + header, range.end));
        }
    }
    for (start, end) in moof_positions {
        for b in boxes(&fragment[start..end]) {
            let (kind, header, range) = b?;
            if &kind != b"traf" {
                continue;
            }
            let traf_start = start + range.start + header;
            let traf_end = start + range.end;
            for c in boxes(&fragment[traf_start..traf_end]) {
                let (kind, header, range) = c?;
                if &kind == b"tfdt" {
                    let body = traf_start + range.start + header;
                    let version = *fragment
                        .get(body)
                        .ok_or_else(|| protocol("truncated tfdt"))?;
                    tfdts.push((body, version));
                }
            }
        }
    }
    let read = |data: &[u8], (body, version): (usize, u8)| -> Result<u64> {
        match version {
            0 => data
                .get(body + 4..body + 8)
                .map(|b| u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
                .ok_or_else(|| protocol("truncated tfdt")),
            1 => data
                .get(body + 4..body + 12)
                .map(|b| {
                    let mut a = [0u8; 8];
                    a.copy_from_slice(b);
                    u64::from_be_bytes(a)
                })
                .ok_or_else(|| protocol("truncated tfdt")),
            v => Err(protocol(format!("unknown tfdt version {v}"))),
        }
    };
    let first = *tfdts
        .first()
        .ok_or_else(|| protocol("the media fragment has no moof/traf/tfdt"))?;
    let original = read(fragment, first)?;
    for &(body, version) in &tfdts {
        let old = read(fragment, (body, version))?;
        let value = new_time
            .checked_add(old.saturating_sub(original))
            .ok_or_else(|| protocol("decode time overflow"))?;
        match version {
            0 => {
                let v = u32::try_from(value).map_err(|_| {
                    protocol(format!(
                        "decode time {value} does not fit a version-0 tfdt (restart the timeline)"
                    ))
                })?;
                fragment[body + 4..body + 8].copy_from_slice(&v.to_be_bytes());
            }
            _ => fragment[body + 4..body + 12].copy_from_slice(&value.to_be_bytes()),
        }
    }
    Ok(original)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    fn fragment(tfdt_version: u8, time: u64) -> Vec<u8> {
        let mut tfdt = vec![tfdt_version, 0, 0, 0];
        if tfdt_version == 0 {
            tfdt.extend_from_slice(&(time as u32).to_be_bytes());
        } else {
            tfdt.extend_from_slice(&time.to_be_bytes());
        }
        let traf = boxed(
            b"traf",
            &[boxed(b"tfhd", &[0; 8]), boxed(b"tfdt", &tfdt)].concat(),
        );
        let moof = boxed(b"moof", &[boxed(b"mfhd", &[0; 8]), traf].concat());
        [moof, boxed(b"mdat", &[1, 2, 3])].concat()
    }

    #[test]
    fn rebases_version_1_and_0() {
        let mut f = fragment(1, 1 << 40);
        assert_eq!(rebase(&mut f, 90_000).unwrap(), 1 << 40);
        assert_eq!(rebase(&mut f, 0).unwrap(), 90_000);
        let mut f = fragment(0, 5000);
        assert_eq!(rebase(&mut f, 7).unwrap(), 5000);
        assert_eq!(rebase(&mut f, 8).unwrap(), 7);
        let err = rebase(&mut f, 1 << 33).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
    }

    #[test]
    fn multiple_moofs_keep_their_spacing() {
        let mut f = [fragment(1, 1000), fragment(1, 1500)].concat();
        rebase(&mut f, 10).unwrap();
        let second = f.len() / 2;
        assert_eq!(rebase(&mut f[second..], 0).unwrap(), 510);
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(rebase(&mut [0, 0, 0, 99, b'm', b'o', b'o', b'f'], 0).is_err());
        assert!(rebase(&mut boxed(b"mdat", &[1]), 0).is_err());
        assert!(init_timescale(&boxed(b"moov", &[])).is_err());
    }

    #[test]
    fn reads_the_timescale() {
        let mut mdhd = vec![0u8; 4 + 8];
        mdhd.extend_from_slice(&90_000u32.to_be_bytes());
        mdhd.extend_from_slice(&[0; 8]);
        let init = boxed(
            b"moov",
            &boxed(b"trak", &boxed(b"mdia", &boxed(b"mdhd", &mdhd))),
        );
        assert_eq!(
            init_timescale(&[boxed(b"ftyp", b"iso5"), init].concat()).unwrap(),
            90_000
        );
    }
}
