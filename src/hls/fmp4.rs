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

/// How far the earliest presentation time of a media fragment's first track fragment lies after
/// its decode time (`tfdt`), in ticks: the smallest (decode offset + composition offset) of its
/// samples. 0 without B-frames; with them an encoder either gives the first (key) frame a
/// positive composition offset (the key frame is shown after the frames decoded before it,
/// typically 1–2 frame durations) or uses negative offsets for the B-frames (`trun` version 1,
/// CMAF) so that it is 0. The reader puts the fragment's *presentation* start on its
/// timeline, so both give exact producer times. Samples without a duration (none in `trun`
/// and no default in `tfhd`) count from the first sample's composition offset alone.
pub(crate) fn presentation_lead(fragment: &[u8]) -> Result<i64> {
    let Some(traf) = child(fragment, &[b"moof", b"traf"])? else {
        return Err(protocol("the media fragment has no moof/traf"));
    };
    let mut default_duration: Option<u32> = None;
    let mut lead: Option<i64> = None;
    for b in boxes(traf) {
        let (kind, header, range) = b?;
        let body = &traf[range.start + header..range.end];
        let u32_at = |at: usize| -> Result<u32> {
            body.get(at..at.checked_add(4).ok_or_else(|| protocol("trun overflow"))?)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
                .ok_or_else(|| protocol(format!("truncated {}", String::from_utf8_lossy(&kind))))
        };
        match &kind {
            b"tfhd" => {
                let flags = u32_at(0)? & 0x00FF_FFFF;
                // track_ID, then the optional fields in this order.
                let mut at = 8usize;
                if flags & 0x01 != 0 {
                    at += 8; // base_data_offset
                }
                if flags & 0x02 != 0 {
                    at += 4; // sample_description_index
                }
                if flags & 0x08 != 0 {
                    default_duration = Some(u32_at(at)?);
                }
            }
            b"trun" => {
                let word = u32_at(0)?;
                let (version, flags) = (word >> 24, word & 0x00FF_FFFF);
                if flags & 0x800 == 0 {
                    // No composition offsets: presented in decode order, from the tfdt.
                    lead = Some(0);
                    break;
                }
                let count = u32_at(4)?;
                let mut at = 8usize;
                if flags & 0x001 != 0 {
                    at += 4; // data_offset
                }
                if flags & 0x004 != 0 {
                    at += 4; // first_sample_flags
                }
                let per_sample = [0x100u32, 0x200, 0x400, 0x800]
                    .iter()
                    .filter(|f| flags & **f != 0)
                    .count()
                    * 4;
                let mut decode: i64 = 0;
                // Bounded by the box: a hostile count cannot make this loop run long.
                let samples = (count as usize).min(body.len() / per_sample.max(1));
                for i in 0..samples {
                    let base = at + i * per_sample;
                    let mut field = base;
                    let duration = if flags & 0x100 != 0 {
                        let d = u32_at(field)?;
                        field += 4;
                        Some(d)
                    } else {
                        default_duration
                    };
                    if flags & 0x200 != 0 {
                        field += 4;
                    }
                    if flags & 0x400 != 0 {
                        field += 4;
                    }
                    let raw = u32_at(field)?;
                    let offset = if version == 0 {
                        i64::from(raw)
                    } else {
                        i64::from(raw as i32)
                    };
                    let presented = decode.saturating_add(offset);
                    lead = Some(lead.map_or(presented, |l| l.min(presented)));
                    match duration {
                        Some(d) => decode = decode.saturating_add(i64::from(d)),
                        // Unknown durations: only the first sample is placed.
                        None => break,
                    }
                }
                // Only the first trun starts at the tfdt; later ones follow it.
                break;
            }
            _ => {}
        }
    }
    Ok(lead.unwrap_or(0))
}

/// Rewrites negative composition offsets (`trun` version 1) as non-negative ones: each
/// `trun` whose smallest offset is negative gets that much added to every offset and becomes
/// version 0. Presentation order and spacing stay; only the distance between decode and
/// presentation time grows, which [`presentation_lead`] then measures. Demuxers treat negative
/// offsets differently (GStreamer's `qtdemux` shifts the whole stream by them), non-negative
/// ones all the same way. Returns how many `trun` boxes were rewritten.
pub(crate) fn normalize_composition_offsets(fragment: &mut [u8]) -> Result<usize> {
    // (absolute offset of a trun's body, its per-sample composition offset positions)
    let mut truns: Vec<(usize, Vec<usize>)> = Vec::new();
    for (_, kind, range) in traf_children(fragment)? {
        if &kind != b"trun" {
            continue;
        }
        let (body, end) = (range.start, range.end);
        let word = |at: usize| {
            fragment
                .get(at..at.checked_add(4)?)
                .filter(|_| at + 4 <= end)
                .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        };
        let head = word(body).ok_or_else(|| protocol("truncated trun"))?;
        let (version, flags) = (head >> 24, head & 0x00FF_FFFF);
        if version != 1 || flags & 0x800 == 0 {
            continue;
        }
        let count = word(body + 4).ok_or_else(|| protocol("truncated trun"))?;
        let mut at = body + 8;
        if flags & 0x001 != 0 {
            at += 4;
        }
        if flags & 0x004 != 0 {
            at += 4;
        }
        let before = [0x100u32, 0x200, 0x400]
            .iter()
            .filter(|f| flags & **f != 0)
            .count()
            * 4;
        let per_sample = before + 4;
        let mut positions = Vec::new();
        for i in 0..count as usize {
            let field = at + i * per_sample + before;
            if field + 4 > end {
                return Err(protocol(format!(
                    "trun says {count} samples, its box holds {i}"
                )));
            }
            positions.push(field);
        }
        truns.push((body, positions));
    }
    let mut rewritten = 0;
    for (body, positions) in truns {
        let read = |data: &[u8], at: usize| {
            i32::from_be_bytes([data[at], data[at + 1], data[at + 2], data[at + 3]])
        };
        let Some(min) = positions.iter().map(|&p| read(fragment, p)).min() else {
            continue;
        };
        if min >= 0 {
            fragment[body] = 0;
            continue;
        }
        let shift = i64::from(min).unsigned_abs();
        for &p in &positions {
            let value = u32::try_from(i64::from(read(fragment, p)) + shift as i64)
                .map_err(|_| protocol("composition offset out of range"))?;
            fragment[p..p + 4].copy_from_slice(&value.to_be_bytes());
        }
        fragment[body] = 0;
        rewritten += 1;
    }
    Ok(rewritten)
}

/// (track_ID, media timescale) of every track of an init segment, in order (KVS: track 1 the
/// video, track 2 the audio when the producer sends it).
pub(crate) fn init_track_timescales(init: &[u8]) -> Result<Vec<(u32, u32)>> {
    let moov = child(init, &[b"moov"])?.ok_or_else(|| protocol("the init segment has no moov"))?;
    let mut tracks = Vec::new();
    for b in boxes(moov) {
        let (kind, header, range) = b?;
        if &kind != b"trak" {
            continue;
        }
        let trak = &moov[range.start + header..range.end];
        let tkhd = child(trak, &[b"tkhd"])?.ok_or_else(|| protocol("a trak without tkhd"))?;
        // version(1) flags(3), then v0: ctime(4) mtime(4) track_ID; v1: ctime(8) mtime(8).
        let at = match tkhd.first() {
            Some(0) => 12,
            Some(1) => 20,
            _ => return Err(protocol("unknown tkhd version")),
        };
        let id = tkhd
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .ok_or_else(|| protocol("truncated tkhd"))?;
        let mdhd = child(trak, &[b"mdia", b"mdhd"])?
            .ok_or_else(|| protocol("a trak without mdia/mdhd"))?;
        let at = match mdhd.first() {
            Some(0) => 12,
            Some(1) => 20,
            _ => return Err(protocol("unknown mdhd version")),
        };
        let timescale = mdhd
            .get(at..at + 4)
            .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .filter(|t| *t > 0)
            .ok_or_else(|| protocol("truncated mdhd or timescale 0"))?;
        tracks.push((id, timescale));
    }
    Ok(tracks)
}

/// Where a `tfdt` is: the absolute offset of its full-box body, its version, and the track of
/// its `traf` (from `tfhd`; 0 if unreadable).
#[derive(Clone, Copy)]
struct Tfdt {
    body: usize,
    version: u8,
    track: u32,
}

/// A child box of a `moof/traf`: which `traf` (counted over the whole fragment), the box type,
/// and the absolute range of its body.
type TrafChild = (usize, [u8; 4], std::ops::Range<usize>);

/// Every child box of every `moof/traf` in `fragment`, in order.
fn traf_children(fragment: &[u8]) -> Result<Vec<TrafChild>> {
    let mut out = Vec::new();
    let mut traf_number = 0;
    for b in boxes(fragment) {
        let (kind, header, range) = b?;
        if &kind != b"moof" {
            continue;
        }
        let moof_body = range.start + header;
        for t in boxes(&fragment[moof_body..range.end]) {
            let (kind, header, traf) = t?;
            if &kind != b"traf" {
                continue;
            }
            let traf_body = moof_body + traf.start + header;
            for c in boxes(&fragment[traf_body..moof_body + traf.end]) {
                let (kind, header, child) = c?;
                out.push((
                    traf_number,
                    kind,
                    traf_body + child.start + header..traf_body + child.end,
                ));
            }
            traf_number += 1;
        }
    }
    Ok(out)
}

/// The `tfdt` boxes of every `moof/traf` in `fragment`, in order.
fn tfdts(fragment: &[u8]) -> Result<Vec<Tfdt>> {
    let mut found = Vec::new();
    let mut track = (usize::MAX, 0u32);
    for (traf, kind, range) in traf_children(fragment)? {
        let body = range.start;
        if &kind == b"tfhd" {
            let id = fragment
                .get(body + 4..body + 8)
                .map_or(0, |b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]));
            track = (traf, id);
        }
        if &kind == b"tfdt" {
            let version = *fragment
                .get(body)
                .ok_or_else(|| protocol("truncated tfdt"))?;
            found.push(Tfdt {
                body,
                version,
                track: if track.0 == traf { track.1 } else { 0 },
            });
        }
    }
    Ok(found)
}

fn read_tfdt(data: &[u8], tfdt: Tfdt) -> Result<u64> {
    let at = |n: usize| {
        tfdt.body
            .checked_add(4)
            .and_then(|from| data.get(from..from.checked_add(n)?))
            .ok_or_else(|| protocol("truncated tfdt"))
    };
    match tfdt.version {
        0 => {
            let b = at(4)?;
            Ok(u64::from(u32::from_be_bytes([b[0], b[1], b[2], b[3]])))
        }
        1 => {
            let mut a = [0u8; 8];
            a.copy_from_slice(at(8)?);
            Ok(u64::from_be_bytes(a))
        }
        v => Err(protocol(format!("unknown tfdt version {v}"))),
    }
}

/// Sets the decode time of a media fragment's first `moof` to `new_time` (ticks) and shifts the
/// `tfdt` of every further `moof` by the same amount. Returns the original first decode time.
///
/// Track fragments of other tracks (an audio track beside the video) move by the same *time*,
/// converted to their own timescale from `timescales` ((track_ID, timescale) of the init
/// segment): an audio `tfdt` in 48 kHz ticks must not be shifted by a count of 90 kHz ticks.
/// A track missing from `timescales` moves like the first.
///
/// A version-0 `tfdt` holds 32 bits (13.25 h at 90 kHz): when a new value does not fit, the
/// fragment's `tfdt` boxes are rewritten as version 1 (the boxes around them grow by 4 bytes
/// each and the sample data offsets follow), so a source runs for days on one timeline.
pub(crate) fn rebase(
    fragment: &mut Vec<u8>,
    new_time: u64,
    timescales: &[(u32, u32)],
) -> Result<u64> {
    let mut found = tfdts(fragment)?;
    let first = *found
        .first()
        .ok_or_else(|| protocol("the media fragment has no moof/traf/tfdt"))?;
    let original = read_tfdt(fragment, first)?;
    let timescale = |track: u32| {
        timescales
            .iter()
            .find(|(id, _)| *id == track)
            .map(|(_, t)| i128::from(*t))
    };
    let first_scale = timescale(first.track);
    // The shift in nanoseconds (of the first track's clock).
    let shift_ns = first_scale
        .map(|scale| (i128::from(new_time) - i128::from(original)) * 1_000_000_000 / scale);
    let mut values = Vec::with_capacity(found.len());
    for &tfdt in &found {
        let old = read_tfdt(fragment, tfdt)?;
        let other = (tfdt.track != first.track)
            .then(|| timescale(tfdt.track).zip(shift_ns))
            .flatten();
        let value = match other {
            Some((scale, shift)) => {
                let moved = i128::from(old) + shift * scale / 1_000_000_000;
                u64::try_from(moved.max(0)).map_err(|_| protocol("decode time overflow"))?
            }
            None => new_time
                .checked_add(old.saturating_sub(original))
                .ok_or_else(|| protocol("decode time overflow"))?,
        };
        values.push(value);
    }
    let fits = |(t, v): (&Tfdt, &u64)| t.version == 1 || u32::try_from(*v).is_ok();
    if !found.iter().zip(&values).all(fits) {
        *fragment = upgrade_tfdts(fragment)?;
        found = tfdts(fragment)?;
        if found.len() != values.len() || found.iter().any(|t| t.version != 1) {
            return Err(protocol(
                "tfdt boxes changed while upgrading them to version 1",
            ));
        }
    }
    for (tfdt, value) in found.iter().zip(values) {
        let at = tfdt.body + 4;
        match tfdt.version {
            0 => {
                let v = u32::try_from(value).map_err(|_| protocol("decode time overflow"))?;
                fragment[at..at + 4].copy_from_slice(&v.to_be_bytes());
            }
            _ => fragment[at..at + 8].copy_from_slice(&value.to_be_bytes()),
        }
    }
    Ok(original)
}

/// Writes a box header for a body of `body_len` bytes in the form of the original header (8 or
/// 16 bytes, or 0 = "to the end" kept as is).
fn put_header(
    out: &mut Vec<u8>,
    original: &[u8],
    header: usize,
    kind: &[u8; 4],
    body_len: usize,
) -> Result<()> {
    let too_big = || protocol("MP4 box too large");
    let to_end = original.get(..4) == Some(&[0, 0, 0, 0][..]);
    if header == 16 {
        let size =
            u64::try_from(body_len.checked_add(16).ok_or_else(too_big)?).map_err(|_| too_big())?;
        out.extend_from_slice(&1u32.to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(&size.to_be_bytes());
    } else {
        let size = if to_end {
            0
        } else {
            u32::try_from(body_len.checked_add(8).ok_or_else(too_big)?).map_err(|_| too_big())?
        };
        out.extend_from_slice(&size.to_be_bytes());
        out.extend_from_slice(kind);
    }
    Ok(())
}

/// `fragment` with every version-0 `tfdt` in its `moof`s rewritten as version 1 (same value):
/// `tfdt`, `traf` and `moof` grow by 4 bytes per upgraded box, `trun` data offsets relative to
/// the `moof` and explicit `tfhd` base data offsets move by the growth, so every sample offset
/// still points at the same bytes of `mdat`.
fn upgrade_tfdts(fragment: &[u8]) -> Result<Vec<u8>> {
    let overflow = || protocol("MP4 offset overflow while upgrading tfdt");
    let mut out = Vec::with_capacity(fragment.len().saturating_add(64));
    // How far everything after the current moof has moved so far.
    let mut shift: u64 = 0;
    for b in boxes(fragment) {
        let (kind, header, range) = b?;
        let whole = &fragment[range.clone()];
        if &kind != b"moof" {
            out.extend_from_slice(whole);
            continue;
        }
        let body = &whole[header..];
        // Count the upgrades first: the growth of this moof is needed by its truns.
        let mut upgrades = 0usize;
        for t in boxes(body) {
            let (kind, th, traf) = t?;
            if &kind == b"traf" {
                for c in boxes(&body[traf.start + th..traf.end]) {
                    let (kind, ch, tfdt) = c?;
                    let tfdt_body = &body[traf.start + th..traf.end][tfdt.start + ch..tfdt.end];
                    if &kind == b"tfdt" && tfdt_body.first() == Some(&0) {
                        upgrades += 1;
                    }
                }
            }
        }
        let growth = upgrades.checked_mul(4).ok_or_else(overflow)?;
        shift = shift.checked_add(growth as u64).ok_or_else(overflow)?;
        let mut new_body = Vec::with_capacity(body.len() + growth);
        let mut traf_index = 0usize;
        for t in boxes(body) {
            let (kind, th, traf) = t?;
            let traf_whole = &body[traf.clone()];
            if &kind != b"traf" {
                new_body.extend_from_slice(traf_whole);
                continue;
            }
            traf_index += 1;
            let traf_body = &traf_whole[th..];
            let mut children = Vec::with_capacity(traf_body.len() + 4);
            // tfhd flags: 0x000001 base-data-offset-present, 0x020000 default-base-is-moof.
            let mut relative_to_moof = true;
            for c in boxes(traf_body) {
                let (ckind, ch, child) = c?;
                let cwhole = &traf_body[child.clone()];
                let cbody = &cwhole[ch..];
                match &ckind {
                    b"tfdt" if cbody.first() == Some(&0) => {
                        let value = cbody
                            .get(4..8)
                            .map(|v| u32::from_be_bytes([v[0], v[1], v[2], v[3]]))
                            .ok_or_else(|| protocol("truncated tfdt"))?;
                        put_header(&mut children, cwhole, ch, b"tfdt", 12)?;
                        children.push(1);
                        children.extend_from_slice(&cbody[1..4]);
                        children.extend_from_slice(&u64::from(value).to_be_bytes());
                    }
                    b"tfhd" => {
                        let flags = full_box_flags(cbody)?;
                        let mut copy = cwhole.to_vec();
                        if flags & 0x01 != 0 {
                            let at = ch + 8;
                            let bytes = copy
                                .get_mut(at..at + 8)
                                .ok_or_else(|| protocol("truncated tfhd"))?;
                            let mut a = [0u8; 8];
                            a.copy_from_slice(bytes);
                            let moved = u64::from_be_bytes(a)
                                .checked_add(shift)
                                .ok_or_else(overflow)?;
                            bytes.copy_from_slice(&moved.to_be_bytes());
                            relative_to_moof = false;
                        } else if flags & 0x02_0000 == 0 && traf_index > 1 {
                            // Relative to the previous traf's data, which moved as much as this.
                            relative_to_moof = false;
                        }
                        children.extend_from_slice(&copy);
                    }
                    b"trun" if relative_to_moof => {
                        let flags = full_box_flags(cbody)?;
                        let mut copy = cwhole.to_vec();
                        if flags & 0x01 != 0 {
                            let at = ch + 8;
                            let bytes = copy
                                .get_mut(at..at + 4)
                                .ok_or_else(|| protocol("truncated trun"))?;
                            let offset =
                                i32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
                            let moved = i32::try_from(growth)
                                .ok()
                                .and_then(|g| offset.checked_add(g))
                                .ok_or_else(overflow)?;
                            bytes.copy_from_slice(&moved.to_be_bytes());
                        }
                        children.extend_from_slice(&copy);
                    }
                    _ => children.extend_from_slice(cwhole),
                }
            }
            put_header(&mut new_body, traf_whole, th, b"traf", children.len())?;
            new_body.extend_from_slice(&children);
        }
        put_header(&mut out, whole, header, b"moof", new_body.len())?;
        out.extend_from_slice(&new_body);
    }
    Ok(out)
}

/// The 24-bit flags of a full box body.
fn full_box_flags(body: &[u8]) -> Result<u32> {
    body.get(..4)
        .map(|b| u32::from_be_bytes([0, b[1], b[2], b[3]]))
        .ok_or_else(|| protocol("truncated full box"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn boxed(kind: &[u8; 4], body: &[u8]) -> Vec<u8> {
        let mut out = ((body.len() + 8) as u32).to_be_bytes().to_vec();
        out.extend_from_slice(kind);
        out.extend_from_slice(body);
        out
    }

    /// moof{mfhd, traf{tfhd(default-base-is-moof), tfdt, trun(data offset)}} mdat{samples}: the
    /// trun's data offset points at the first byte of the mdat body, like KVS fragments.
    fn fragment_with(tfdt_version: u8, time: u64, samples: &[u8]) -> Vec<u8> {
        let mut tfdt = vec![tfdt_version, 0, 0, 0];
        if tfdt_version == 0 {
            tfdt.extend_from_slice(&(time as u32).to_be_bytes());
        } else {
            tfdt.extend_from_slice(&time.to_be_bytes());
        }
        let tfhd = boxed(b"tfhd", &[0, 2, 0, 0, 0, 0, 0, 1]);
        let build = |offset: i32| {
            let mut trun = vec![0, 0, 0, 1, 0, 0, 0, 1];
            trun.extend_from_slice(&offset.to_be_bytes());
            let traf = boxed(
                b"traf",
                &[tfhd.clone(), boxed(b"tfdt", &tfdt), boxed(b"trun", &trun)].concat(),
            );
            boxed(b"moof", &[boxed(b"mfhd", &[0; 8]), traf].concat())
        };
        let moof_len = build(0).len();
        let moof = build(moof_len as i32 + 8);
        [moof, boxed(b"mdat", samples)].concat()
    }

    fn fragment(tfdt_version: u8, time: u64) -> Vec<u8> {
        fragment_with(tfdt_version, time, &[1, 2, 3])
    }

    /// The sample bytes the first trun of every moof points at (moof start + data offset).
    fn sample_starts(data: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        for b in boxes(data) {
            let (kind, header, range) = b.unwrap();
            if &kind != b"moof" {
                continue;
            }
            let trun = child(&data[range.clone()][header..], &[b"traf", b"trun"])
                .unwrap()
                .unwrap();
            let offset = i32::from_be_bytes([trun[8], trun[9], trun[10], trun[11]]);
            out.push(data[range.start + offset as usize]);
        }
        out
    }

    fn first_tfdt(data: &[u8]) -> (u8, u64) {
        let t = tfdts(data).unwrap()[0];
        (t.version, read_tfdt(data, t).unwrap())
    }

    /// moof{traf{tfhd(flags, default duration), tfdt, trun(version, flags, samples)}}: each
    /// sample (duration, composition offset), written as the flags say.
    fn fragment_with_offsets(
        tfhd_default: Option<u32>,
        trun_version: u8,
        with_durations: bool,
        samples: &[(u32, i32)],
    ) -> Vec<u8> {
        let mut tfhd = vec![0, 0, 0, if tfhd_default.is_some() { 0x08 } else { 0 }];
        tfhd.extend_from_slice(&1u32.to_be_bytes());
        if let Some(d) = tfhd_default {
            tfhd.extend_from_slice(&d.to_be_bytes());
        }
        let mut tfdt = vec![0, 0, 0, 0];
        tfdt.extend_from_slice(&1000u32.to_be_bytes());
        let flags: u32 = 0x001 | 0x800 | if with_durations { 0x100 } else { 0 };
        let mut trun = ((u32::from(trun_version) << 24) | flags)
            .to_be_bytes()
            .to_vec();
        trun.extend_from_slice(&(samples.len() as u32).to_be_bytes());
        trun.extend_from_slice(&0i32.to_be_bytes());
        for &(duration, offset) in samples {
            if with_durations {
                trun.extend_from_slice(&duration.to_be_bytes());
            }
            trun.extend_from_slice(&offset.to_be_bytes());
        }
        let traf = boxed(
            b"traf",
            &[
                boxed(b"tfhd", &tfhd),
                boxed(b"tfdt", &tfdt),
                boxed(b"trun", &trun),
            ]
            .concat(),
        );
        boxed(b"moof", &[boxed(b"mfhd", &[0; 8]), traf].concat())
    }

    #[test]
    fn the_presentation_lead_is_the_earliest_composition_time() {
        // No B-frames: 0.
        assert_eq!(presentation_lead(&fragment(0, 5)).unwrap(), 0);
        // I P B B (decode order), positive offsets (x264 style): the key frame at 2 frames.
        let ipbb = [(3600, 7200), (3600, 10_800), (3600, 0), (3600, 0)];
        assert_eq!(
            presentation_lead(&fragment_with_offsets(None, 0, true, &ipbb)).unwrap(),
            7200
        );
        // The same durations from tfhd's default.
        let offsets_only = [(0, 7200), (0, 10_800), (0, 0), (0, 0)];
        assert_eq!(
            presentation_lead(&fragment_with_offsets(Some(3600), 0, false, &offsets_only)).unwrap(),
            7200
        );
        // Negative offsets (trun version 1, CMAF): the key frame at the tfdt.
        let cmaf = [(3600, 0), (3600, 3600), (3600, -3600), (3600, -3600)];
        assert_eq!(
            presentation_lead(&fragment_with_offsets(None, 1, true, &cmaf)).unwrap(),
            0
        );
        // Unknown durations: the first sample's offset alone.
        assert_eq!(
            presentation_lead(&fragment_with_offsets(None, 0, false, &offsets_only)).unwrap(),
            7200
        );
        // No traf: an error, not a panic.
        assert!(presentation_lead(&boxed(b"moof", &[])).is_err());
    }

    #[test]
    fn negative_composition_offsets_become_non_negative_with_the_same_spacing() {
        let cmaf = [(3600, 0), (3600, 7200), (3600, -3600), (3600, -3600)];
        let mut f = fragment_with_offsets(None, 1, true, &cmaf);
        assert_eq!(presentation_lead(&f).unwrap(), 0);
        assert_eq!(normalize_composition_offsets(&mut f).unwrap(), 1);
        // Presentation times 0, 3, 1, 2 frames before; 1, 4, 2, 3 frames after: same order
        // and spacing, the lead is now 1 frame.
        assert_eq!(presentation_lead(&f).unwrap(), 3600);
        let positive = fragment_with_offsets(
            None,
            0,
            true,
            &[(3600, 3600), (3600, 10_800), (3600, 0), (3600, 0)],
        );
        assert_eq!(f, positive, "exactly the positive form");
        // Non-negative fragments are left alone (version 1 becomes 0, values unchanged).
        let mut p = positive.clone();
        assert_eq!(normalize_composition_offsets(&mut p).unwrap(), 0);
        assert_eq!(p, positive);
        // A count the box cannot hold is an error, not a panic.
        let mut bad = fragment_with_offsets(None, 1, true, &cmaf);
        let trun = bad.windows(4).position(|w| w == b"trun").unwrap() + 4;
        bad[trun + 4..trun + 8].copy_from_slice(&99u32.to_be_bytes());
        assert!(normalize_composition_offsets(&mut bad).is_err());
    }

    proptest::proptest! {
        #[test]
        fn presentation_lead_never_panics_on_hostile_fragments(
            data in proptest::collection::vec(proptest::num::u8::ANY, 0..400),
            count in proptest::num::u32::ANY,
        ) {
            let _ = presentation_lead(&data);
            // A well-formed frame around hostile trun contents and sample counts.
            let mut trun = 0x0100_0900u32.to_be_bytes().to_vec();
            trun.extend_from_slice(&count.to_be_bytes());
            trun.extend_from_slice(&data);
            let traf = boxed(b"traf", &[boxed(b"tfhd", &[0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 9]), boxed(b"trun", &trun)].concat());
            let mut moof = boxed(b"moof", &traf);
            let _ = presentation_lead(&moof);
            let _ = normalize_composition_offsets(&mut moof);
            let mut raw = data.clone();
            let _ = normalize_composition_offsets(&mut raw);
        }
    }

    /// An init segment with (track_ID, timescale) tracks, and a fragment whose trafs carry
    /// (track_ID, tfdt) (version 1).
    fn two_tracks(tracks: &[(u32, u32)], trafs: &[(u32, u64)]) -> (Vec<u8>, Vec<u8>) {
        let traks: Vec<u8> = tracks
            .iter()
            .flat_map(|&(id, timescale)| {
                let mut tkhd = vec![0u8; 12];
                tkhd.extend_from_slice(&id.to_be_bytes());
                tkhd.extend_from_slice(&[0; 68]);
                let mut mdhd = vec![0u8; 12];
                mdhd.extend_from_slice(&timescale.to_be_bytes());
                mdhd.extend_from_slice(&[0; 8]);
                boxed(
                    b"trak",
                    &[
                        boxed(b"tkhd", &tkhd),
                        boxed(b"mdia", &boxed(b"mdhd", &mdhd)),
                    ]
                    .concat(),
                )
            })
            .collect();
        let init = [boxed(b"ftyp", b"iso6\0\0\0\0"), boxed(b"moov", &traks)].concat();
        let trafs: Vec<u8> = trafs
            .iter()
            .flat_map(|&(id, time)| {
                let mut tfhd = vec![0, 2, 0, 0];
                tfhd.extend_from_slice(&id.to_be_bytes());
                let mut tfdt = vec![1, 0, 0, 0];
                tfdt.extend_from_slice(&time.to_be_bytes());
                boxed(
                    b"traf",
                    &[boxed(b"tfhd", &tfhd), boxed(b"tfdt", &tfdt)].concat(),
                )
            })
            .collect();
        let fragment = [
            boxed(b"moof", &[boxed(b"mfhd", &[0; 8]), trafs].concat()),
            boxed(b"mdat", &[0]),
        ]
        .concat();
        (init, fragment)
    }

    #[test]
    fn an_audio_track_moves_by_the_same_time_in_its_own_timescale() {
        let (init, mut f) = two_tracks(&[(1, 90_000), (2, 48_000)], &[(1, 1_000), (2, 5_000)]);
        let scales = init_track_timescales(&init).unwrap();
        assert_eq!(scales, [(1, 90_000), (2, 48_000)]);
        assert_eq!(init_timescale(&init).unwrap(), 90_000);
        // One second later on the video clock: 48,000 audio ticks later.
        assert_eq!(rebase(&mut f, 91_000, &scales).unwrap(), 1_000);
        let times: Vec<(u32, u64)> = tfdts(&f)
            .unwrap()
            .into_iter()
            .map(|t| (t.track, read_tfdt(&f, t).unwrap()))
            .collect();
        assert_eq!(times, [(1, 91_000), (2, 53_000)]);
        // Backwards by more than the audio had: clamped at 0, not wrapped.
        assert_eq!(rebase(&mut f, 0, &scales).unwrap(), 91_000);
        let audio = tfdts(&f).unwrap()[1];
        assert_eq!(
            read_tfdt(&f, audio).unwrap(),
            4_467,
            "53,000 − 1.0111 s × 48 kHz"
        );
        // Without the timescales (an older caller): the same ticks for every track.
        let (_, mut g) = two_tracks(&[], &[(1, 1_000), (2, 5_000)]);
        rebase(&mut g, 2_000, &[]).unwrap();
        let audio = tfdts(&g).unwrap()[1];
        assert_eq!(read_tfdt(&g, audio).unwrap(), 6_000);
    }

    #[test]
    fn rebases_version_1_and_0() {
        let mut f = fragment(1, 1 << 40);
        assert_eq!(rebase(&mut f, 90_000, &[]).unwrap(), 1 << 40);
        assert_eq!(rebase(&mut f, 0, &[]).unwrap(), 90_000);
        let mut f = fragment(0, 5000);
        assert_eq!(rebase(&mut f, 7, &[]).unwrap(), 5000);
        assert_eq!(rebase(&mut f, 8, &[]).unwrap(), 7);
        assert_eq!(first_tfdt(&f), (0, 8), "a value that fits stays version 0");
    }

    #[test]
    fn version_0_past_32_bits_becomes_version_1() {
        // 24 h at 90 kHz is 7.8e9 ticks: past u32::MAX (13.25 h).
        let day = 24 * 3600 * 90_000u64;
        let original = [
            fragment_with(0, 1000, &[7, 8, 9]),
            fragment_with(0, 4000, &[5, 6]),
        ]
        .concat();
        assert_eq!(sample_starts(&original), [7, 5]);
        let mut f = original.clone();
        assert_eq!(rebase(&mut f, day, &[]).unwrap(), 1000);
        assert_eq!(
            f.len(),
            original.len() + 8,
            "two tfdt boxes grew by 4 bytes"
        );
        assert_eq!(first_tfdt(&f), (1, day));
        let all = tfdts(&f).unwrap();
        assert_eq!(
            read_tfdt(&f, all[1]).unwrap(),
            day + 3000,
            "the spacing is kept"
        );
        assert_eq!(
            sample_starts(&f),
            [7, 5],
            "data offsets still point at the samples"
        );
        // The mdat bodies are untouched, and the upgraded fragment rebases back down.
        assert!(f.ends_with(&boxed(b"mdat", &[5, 6])));
        assert_eq!(rebase(&mut f, 1000, &[]).unwrap(), day);
        assert_eq!(first_tfdt(&f), (1, 1000));
    }

    #[test]
    fn multiple_moofs_keep_their_spacing() {
        let mut f = [fragment(1, 1000), fragment(1, 1500)].concat();
        rebase(&mut f, 10, &[]).unwrap();
        let second = f.len() / 2;
        assert_eq!(rebase(&mut f[second..].to_vec(), 0, &[]).unwrap(), 510);
    }

    #[test]
    fn garbage_is_a_protocol_error() {
        assert!(rebase(&mut vec![0, 0, 0, 99, b'm', b'o', b'o', b'f'], 0, &[]).is_err());
        assert!(rebase(&mut boxed(b"mdat", &[1]), 0, &[]).is_err());
        assert!(init_timescale(&boxed(b"moov", &[])).is_err());
        let mut two = [fragment(1, 0), fragment(1, 10)].concat();
        let err = rebase(&mut two, u64::MAX - 5, &[]).unwrap_err();
        assert_eq!(err.kind(), ErrorKind::Protocol);
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

    proptest! {
        #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

        /// Arbitrary bytes: an error or a result, never a panic.
        #[test]
        fn arbitrary_bytes_never_panic(mut data in proptest::collection::vec(any::<u8>(), 0..512), t in any::<u64>()) {
            let _ = init_timescale(&data);
            let _ = rebase(&mut data, t, &[]);
        }

        /// A valid fragment with a few bytes changed anywhere: never a panic.
        #[test]
        fn mutated_fragments_never_panic(
            version in 0u8..2,
            time in any::<u32>(),
            edits in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
            t in any::<u64>(),
        ) {
            let mut f = [fragment(version, u64::from(time)), fragment(version, u64::from(time) + 9)].concat();
            for (at, byte) in edits {
                let i = at.index(f.len());
                f[i] = byte;
            }
            let _ = rebase(&mut f, t, &[]);
        }

        /// Rebasing to any time and back restores the fragment; the samples stay where the
        /// offsets say, whether or not the boxes had to grow.
        #[test]
        fn rebase_round_trips(version in 0u8..2, time in any::<u32>(), gap in 0u32..1_000_000, to in 0u64..(1 << 50)) {
            // A version-0 tfdt holds 32 bits: the second fragment's time must fit.
            let time = if version == 0 { time.min(u32::MAX - gap) } else { time };
            let original = [fragment_with(version, u64::from(time), &[1, 2]),
                            fragment_with(version, u64::from(time) + u64::from(gap), &[3])].concat();
            let mut f = original.clone();
            prop_assert_eq!(rebase(&mut f, to, &[]).unwrap(), u64::from(time));
            prop_assert_eq!(sample_starts(&f), vec![1, 3]);
            let all = tfdts(&f).unwrap();
            prop_assert_eq!(read_tfdt(&f, all[1]).unwrap(), to + u64::from(gap));
            prop_assert_eq!(rebase(&mut f, u64::from(time), &[]).unwrap(), to);
            if f.len() == original.len() {
                prop_assert_eq!(f, original);
            } else {
                prop_assert!(to > u64::from(u32::MAX) - u64::from(gap));
                prop_assert_eq!(sample_starts(&f), vec![1, 3]);
            }
        }
    }
}
