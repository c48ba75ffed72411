//! An incremental reader of the `GetMedia` payload: Matroska (MKV) fragments, each its own EBML
//! document, read as their bytes arrive.
//!
//! The EBML layer is `webm-iterable`'s push decoder ([`TagDecoder`] over the [`MatroskaSpec`]),
//! which follows unknown-size elements (the Segment and Cluster of a live fragment) and ends
//! them where an element that cannot be their child begins. This module turns its tags into
//! what the reader needs: a new document, the video track, KVS's tags, cluster timecodes and
//! blocks. Every size is bounded ([`MAX_ELEMENT`]); a malformed payload is a typed
//! [`ErrorKind::Protocol`] error naming the byte offset.

use bytes::{Bytes, BytesMut};
use ebml_iterable::TagDecoder;
use webm_iterable::matroska_spec::{Master, MatroskaSpec};

use crate::error::{Error, ErrorKind, Result};

/// The largest element the reader buffers (a frame, codec private data, a tag): 64 MiB. A
/// GetMedia connection carries at most 25 MB/s, and KVS frames are far smaller.
pub(crate) const MAX_ELEMENT: usize = 64 << 20;

/// The video track of a fragment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Track {
    pub number: u64,
    pub codec_id: String,
    pub codec_private: Option<Bytes>,
    pub width: Option<u64>,
    pub height: Option<u64>,
}

/// What the payload says, in order.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Event {
    /// An EBML header: a new fragment begins.
    Document,
    /// `TimecodeScale` (ns per tick) of the segment.
    TimecodeScale(u64),
    /// A video track entry.
    Track(Track),
    /// A simple tag (`TagName`, `TagString`).
    Tag { name: String, value: String },
    /// A cluster begins.
    Cluster,
    /// The cluster's timecode (ticks).
    ClusterTimecode(u64),
    /// A block of the cluster (`timecode` relative to the cluster, in ticks).
    Block {
        track: u64,
        timecode: i16,
        key: bool,
        data: Bytes,
    },
    /// The cluster ended (an element after it, or the end of the payload).
    ClusterEnd,
}

/// The push reader: [`push`](Self::push) bytes, then take [`next`](Self::next) events until it
/// answers `None` (more bytes needed).
pub(crate) struct MkvReader {
    decoder: TagDecoder<MatroskaSpec>,
    input: BytesMut,
    /// Bytes pushed so far (for error messages).
    pushed: u64,
    pending: std::collections::VecDeque<Event>,
}

impl std::fmt::Debug for MkvReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MkvReader")
            .field("pushed", &self.pushed)
            .field("buffered", &self.input.len())
            .finish_non_exhaustive()
    }
}

impl Default for MkvReader {
    fn default() -> Self {
        Self::new()
    }
}

impl MkvReader {
    pub(crate) fn new() -> Self {
        // Buffered whole: small masters whose children are needed together.
        let mut decoder = TagDecoder::new(&[
            MatroskaSpec::TrackEntry(Master::Start),
            MatroskaSpec::SimpleTag(Master::Start),
            MatroskaSpec::BlockGroup(Master::Start),
        ]);
        decoder.set_max_allowable_tag_size(Some(MAX_ELEMENT));
        MkvReader {
            decoder,
            input: BytesMut::new(),
            pushed: 0,
            pending: std::collections::VecDeque::new(),
        }
    }

    /// Adds bytes received.
    pub(crate) fn push(&mut self, bytes: &[u8]) {
        self.input.extend_from_slice(bytes);
        self.pushed = self.pushed.saturating_add(bytes.len() as u64);
    }

    /// Bytes received but not yet consumed (a partly received element).
    #[cfg(test)]
    pub(crate) fn buffered(&self) -> usize {
        self.input.len()
    }

    /// The next event, `None` when more bytes are needed.
    pub(crate) fn next(&mut self) -> Result<Option<Event>> {
        loop {
            if let Some(e) = self.pending.pop_front() {
                return Ok(Some(e));
            }
            if self.input.len() > MAX_ELEMENT.saturating_add(64) {
                return Err(Error::new(
                    ErrorKind::Protocol,
                    format!(
                        "GetMedia payload: an element larger than {MAX_ELEMENT} bytes near byte {}",
                        self.decoder.position()
                    ),
                ));
            }
            let tag = match self.decoder.decode(&mut self.input) {
                Ok(Some(tag)) => tag.tag,
                Ok(None) => return Ok(None),
                Err(e) => {
                    return Err(Error::new(
                        ErrorKind::Protocol,
                        format!(
                            "GetMedia payload is not valid MKV near byte {}: {e}",
                            self.decoder.position()
                        ),
                    ));
                }
            };
            self.translate(tag)?;
        }
    }

    fn translate(&mut self, tag: MatroskaSpec) -> Result<()> {
        let event = match tag {
            MatroskaSpec::Ebml(Master::Start) => Event::Document,
            MatroskaSpec::TimestampScale(scale) => Event::TimecodeScale(scale),
            MatroskaSpec::Cluster(Master::Start) => Event::Cluster,
            MatroskaSpec::Cluster(Master::End) => Event::ClusterEnd,
            MatroskaSpec::Timestamp(t) => Event::ClusterTimecode(t),
            MatroskaSpec::TrackEntry(Master::Full(children)) => match track(&children) {
                Some(t) => Event::Track(t),
                None => return Ok(()),
            },
            MatroskaSpec::SimpleTag(Master::Full(children)) => {
                let mut name = None;
                let mut value = None;
                for c in children {
                    match c {
                        MatroskaSpec::TagName(n) => name = Some(n),
                        MatroskaSpec::TagString(v) => value = Some(v),
                        _ => {}
                    }
                }
                match (name, value) {
                    (Some(name), Some(value)) => Event::Tag { name, value },
                    _ => return Ok(()),
                }
            }
            MatroskaSpec::SimpleBlock(raw) => self.block_event(raw, "SimpleBlock", None)?,
            MatroskaSpec::BlockGroup(Master::Full(children)) => {
                // A key frame unless it references another block.
                let key = !children
                    .iter()
                    .any(|c| matches!(c, MatroskaSpec::ReferenceBlock(_)));
                let Some(raw) = children.into_iter().find_map(|c| match c {
                    MatroskaSpec::Block(raw) => Some(raw),
                    _ => None,
                }) else {
                    return Ok(());
                };
                self.block_event(raw, "Block", Some(key))?
            }
            _ => return Ok(()),
        };
        self.pending.push_back(event);
        Ok(())
    }
}

impl MkvReader {
    /// The event of a (Simple)Block's bytes: its frame is a slice of them (no copy). `key`:
    /// a BlockGroup's (from its ReferenceBlock); a SimpleBlock carries its own flag.
    fn block_event(&self, raw: Vec<u8>, what: &str, key: Option<bool>) -> Result<Event> {
        let block = parse_block(&raw).ok_or_else(|| {
            Error::new(
                ErrorKind::Protocol,
                format!(
                    "GetMedia payload: a {what} of {} bytes near byte {} is not valid",
                    raw.len(),
                    self.decoder.position()
                ),
            )
        })?;
        refuse_lacing(block.laced)?;
        Ok(Event::Block {
            track: block.track,
            timecode: block.timecode,
            key: key.unwrap_or(block.flags & 0x80 != 0),
            data: Bytes::from(raw).slice(block.payload_at..),
        })
    }
}

/// The header of a (Simple)Block (RFC 9559 §10.1): track number (an EBML vint), a signed
/// 16-bit timecode, flags; then the frame, from `payload_at`.
struct BlockHeader {
    track: u64,
    timecode: i16,
    flags: u8,
    laced: bool,
    payload_at: usize,
}

/// Reads a block header, `None` when `data` is too short or the track number is not a vint.
/// (Parsed here, bounds-checked: webm-iterable's `Block`/`SimpleBlock` conversions index past
/// the end of short blocks — found by the property tests below.)
fn parse_block(data: &[u8]) -> Option<BlockHeader> {
    let first = *data.first()?;
    let len = usize::try_from(first.leading_zeros()).ok()? + 1;
    if len > 8 {
        return None;
    }
    let mut track = u64::from(first) & (0xFF >> len);
    for b in data.get(1..len)? {
        track = (track << 8) | u64::from(*b);
    }
    let timecode = i16::from_be_bytes([*data.get(len)?, *data.get(len + 1)?]);
    let flags = *data.get(len + 2)?;
    Some(BlockHeader {
        track,
        timecode,
        flags,
        laced: flags & 0x06 != 0,
        payload_at: data.get(len + 3..).map(|_| len + 3)?,
    })
}

/// Laced blocks (several frames in one block, an audio technique) are refused for video.
fn refuse_lacing(laced: bool) -> Result<()> {
    if laced {
        return Err(Error::new(
            ErrorKind::UnsupportedMedia,
            "GetMedia payload: laced blocks (several frames in one block) are not supported for video",
        ));
    }
    Ok(())
}

/// The video track described by a TrackEntry's children (other track types: `None`).
fn track(children: &[MatroskaSpec]) -> Option<Track> {
    let mut t = Track {
        number: 0,
        codec_id: String::new(),
        codec_private: None,
        width: None,
        height: None,
    };
    let mut kind = None;
    for c in children {
        match c {
            MatroskaSpec::TrackNumber(n) => t.number = *n,
            MatroskaSpec::TrackType(k) => kind = Some(*k),
            MatroskaSpec::CodecID(id) => t.codec_id.clone_from(id),
            MatroskaSpec::CodecPrivate(p) => t.codec_private = Some(Bytes::copy_from_slice(p)),
            MatroskaSpec::Video(Master::Full(video)) => {
                for v in video {
                    match v {
                        MatroskaSpec::PixelWidth(w) => t.width = Some(*w),
                        MatroskaSpec::PixelHeight(h) => t.height = Some(*h),
                        _ => {}
                    }
                }
            }
            _ => {}
        }
    }
    // TrackType 1 is video; a track without a type but with a video codec counts too.
    let video = kind == Some(1) || (kind.is_none() && t.codec_id.starts_with("V_"));
    video.then_some(t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vint(size: usize) -> Vec<u8> {
        // 8-byte sizes: simple and valid for any length here.
        let mut out = vec![0x01];
        out.extend_from_slice(&(size as u64).to_be_bytes()[1..]);
        out
    }

    fn el(id: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut out = id.to_vec();
        out.extend(vint(payload.len()));
        out.extend_from_slice(payload);
        out
    }

    const UNKNOWN: [u8; 8] = [0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF];

    /// A KVS-shaped fragment: EBML, unknown-size Segment and Cluster, tags before and after.
    fn fragment(number: &str, frames: &[(i16, bool, &[u8])]) -> Vec<u8> {
        let frames: Vec<(u8, i16, bool, &[u8])> =
            frames.iter().map(|&(t, k, d)| (1, t, k, d)).collect();
        fragment_tracks(number, false, &frames)
    }

    /// [`fragment`] with an AAC track 2 when `audio`, and blocks of given track numbers.
    fn fragment_tracks(number: &str, audio: bool, frames: &[(u8, i16, bool, &[u8])]) -> Vec<u8> {
        let mut out = el(&[0x1A, 0x45, 0xDF, 0xA3], &el(&[0x42, 0x82], b"matroska"));
        out.extend_from_slice(&[0x18, 0x53, 0x80, 0x67]);
        out.extend_from_slice(&UNKNOWN);
        out.extend(el(
            &[0x15, 0x49, 0xA9, 0x66],
            &el(&[0x2A, 0xD7, 0xB1], &[0x0F, 0x42, 0x40]),
        ));
        let mut entry = el(&[0xD7], &[1]);
        entry.extend(el(&[0x83], &[1]));
        entry.extend(el(&[0x86], b"V_MPEG4/ISO/AVC"));
        entry.extend(el(&[0x63, 0xA2], &[1, 2, 3]));
        entry.extend(el(
            &[0xE0],
            &[el(&[0xB0], &[0x01, 0x40]), el(&[0xBA], &[0xF0])].concat(),
        ));
        let mut entries = el(&[0xAE], &entry);
        if audio {
            let mut a = el(&[0xD7], &[2]);
            a.extend(el(&[0x83], &[2]));
            a.extend(el(&[0x86], b"A_AAC"));
            entries.extend(el(&[0xAE], &a));
        }
        out.extend(el(&[0x16, 0x54, 0xAE, 0x6B], &entries));
        let simple = |name: &str, value: &str| {
            el(
                &[0x67, 0xC8],
                &[
                    el(&[0x45, 0xA3], name.as_bytes()),
                    el(&[0x44, 0x87], value.as_bytes()),
                ]
                .concat(),
            )
        };
        out.extend(el(
            &[0x12, 0x54, 0xC3, 0x67],
            &el(
                &[0x73, 0x73],
                &simple("AWS_KINESISVIDEO_FRAGMENT_NUMBER", number),
            ),
        ));
        out.extend_from_slice(&[0x1F, 0x43, 0xB6, 0x75]);
        out.extend_from_slice(&UNKNOWN);
        out.extend(el(&[0xE7], &[0x10, 0x00]));
        for (track, tc, key, data) in frames {
            let mut block = vec![0x80 | track];
            block.extend_from_slice(&tc.to_be_bytes());
            block.push(if *key { 0x80 } else { 0 });
            block.extend_from_slice(data);
            out.extend(el(&[0xA3], &block));
        }
        out.extend(el(
            &[0x12, 0x54, 0xC3, 0x67],
            &el(
                &[0x73, 0x73],
                &simple("AWS_KINESISVIDEO_CONTINUATION_TOKEN", "tok"),
            ),
        ));
        out
    }

    fn read_all(reader: &mut MkvReader) -> Vec<Event> {
        let mut events = Vec::new();
        while let Some(e) = reader.next().expect("valid") {
            events.push(e);
        }
        events
    }

    #[test]
    fn two_fragments_byte_by_byte_give_every_event_in_order() {
        let mut payload = fragment("1", &[(0, true, b"key"), (40, false, b"delta")]);
        payload.extend(fragment("2", &[(0, true, b"k2")]));
        let mut reader = MkvReader::new();
        let mut events = Vec::new();
        for b in &payload {
            reader.push(std::slice::from_ref(b));
            events.extend(read_all(&mut reader));
        }
        let blocks: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                Event::Block {
                    timecode,
                    key,
                    data,
                    ..
                } => Some((*timecode, *key, data.to_vec())),
                _ => None,
            })
            .collect();
        assert_eq!(
            blocks,
            vec![
                (0, true, b"key".to_vec()),
                (40, false, b"delta".to_vec()),
                (0, true, b"k2".to_vec())
            ]
        );
        let documents = events.iter().filter(|e| **e == Event::Document).count();
        assert_eq!(documents, 2);
        let ends = events.iter().filter(|e| **e == Event::ClusterEnd).count();
        assert_eq!(
            ends, 2,
            "each unknown-size cluster ends at the tags after it: {events:?}"
        );
        assert!(events.contains(&Event::Tag {
            name: "AWS_KINESISVIDEO_FRAGMENT_NUMBER".into(),
            value: "2".into()
        }));
        let track = events.iter().find_map(|e| match e {
            Event::Track(t) => Some(t.clone()),
            _ => None,
        });
        let track = track.expect("track");
        assert_eq!(track.codec_id, "V_MPEG4/ISO/AVC");
        assert_eq!(track.codec_private.as_deref(), Some(&[1u8, 2, 3][..]));
        assert_eq!((track.width, track.height), (Some(320), Some(240)));
        // The end tags come after the cluster's end.
        let end = events
            .iter()
            .position(|e| *e == Event::ClusterEnd)
            .expect("end");
        let token = events
            .iter()
            .position(
                |e| matches!(e, Event::Tag { name, .. } if name.ends_with("CONTINUATION_TOKEN")),
            )
            .expect("token");
        assert!(end < token);
    }

    #[test]
    fn an_audio_track_is_not_announced_and_its_blocks_keep_their_track_number() {
        assert_eq!(
            track(&[
                MatroskaSpec::TrackNumber(2),
                MatroskaSpec::TrackType(2),
                MatroskaSpec::CodecID("A_AAC".into()),
            ]),
            None
        );
        let payload = fragment_tracks(
            "1",
            true,
            &[
                (1, 0, true, b"v0"),
                (2, 5, true, b"a0"),
                (1, 40, false, b"v1"),
            ],
        );
        let mut reader = MkvReader::new();
        reader.push(&payload);
        let events = read_all(&mut reader);
        let tracks: Vec<u64> = events
            .iter()
            .filter_map(|e| match e {
                Event::Track(t) => Some(t.number),
                _ => None,
            })
            .collect();
        assert_eq!(tracks, vec![1], "only the video track: {events:?}");
        let blocks: Vec<(u64, Vec<u8>)> = events
            .iter()
            .filter_map(|e| match e {
                Event::Block { track, data, .. } => Some((*track, data.to_vec())),
                _ => None,
            })
            .collect();
        assert_eq!(
            blocks,
            vec![
                (1, b"v0".to_vec()),
                (2, b"a0".to_vec()),
                (1, b"v1".to_vec())
            ]
        );
    }

    #[test]
    fn a_block_is_given_as_soon_as_its_bytes_are_in() {
        let payload = fragment("1", &[(0, true, b"first"), (40, false, b"second")]);
        // Cut inside the second block: the first is out already.
        let cut = payload
            .windows(6)
            .position(|w| w == b"second")
            .expect("second");
        let mut reader = MkvReader::new();
        reader.push(&payload[..cut]);
        let events = read_all(&mut reader);
        assert!(
            events
                .iter()
                .any(|e| matches!(e, Event::Block { data, .. } if &data[..] == b"first"))
        );
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, Event::Block { data, .. } if &data[..] == b"second"))
        );
    }

    #[test]
    fn an_element_larger_than_the_bound_is_a_protocol_error_not_a_buffer() {
        // A cluster, then a SimpleBlock that claims 2^40 bytes.
        let mut payload = fragment("1", &[]);
        payload.extend_from_slice(&[0x1F, 0x43, 0xB6, 0x75]);
        payload.extend_from_slice(&UNKNOWN);
        payload.extend_from_slice(&[0xA3, 0x01, 0x00, 0x01, 0x00, 0x00, 0x00, 0x00, 0x00]);
        payload.extend_from_slice(&[0u8; 64]);
        let mut reader = MkvReader::new();
        reader.push(&payload);
        let err = loop {
            match reader.next() {
                Ok(Some(_)) => {}
                Ok(None) => panic!("waited for 2^40 bytes instead of refusing the element"),
                Err(e) => break e,
            }
        };
        assert_eq!(err.kind(), ErrorKind::Protocol, "{err}");
        assert!(err.to_string().contains("byte"), "{err}");
    }

    #[test]
    fn block_headers_are_bounds_checked() {
        for short in [
            &[][..],
            &[0x81],
            &[0x81, 0],
            &[0x81, 0, 0],
            &[0x00, 1, 2, 3],
            &[0x40],
        ] {
            assert!(parse_block(short).is_none(), "{short:?}");
        }
        let b = parse_block(&[0x81, 0xFF, 0xFB, 0x80, 7]).expect("valid");
        assert_eq!(
            (b.track, b.timecode, b.flags, b.payload_at),
            (1, -5, 0x80, 4)
        );
        // A 2-byte track number.
        let b = parse_block(&[0x40, 0x82, 0, 40, 0, 9]).expect("valid");
        assert_eq!((b.track, b.timecode), (130, 40));
    }

    proptest::proptest! {
        /// Whatever the bytes and however they are cut, the reader answers without panicking
        /// and without holding more than the input.
        #[test]
        fn hostile_bytes_never_panic(data in proptest::collection::vec(proptest::num::u8::ANY, 0..2048), cut in 1usize..64) {
            let mut reader = MkvReader::new();
            for chunk in data.chunks(cut) {
                reader.push(chunk);
                while let Ok(Some(_)) = reader.next() {}
            }
            proptest::prop_assert!(reader.buffered() <= data.len());
        }

        /// A valid fragment with its bytes mutated: never a panic.
        #[test]
        fn mutated_fragments_never_panic(at in 0usize..400, value in proptest::num::u8::ANY) {
            let mut payload = fragment("1", &[(0, true, b"key"), (40, false, b"delta")]);
            if let Some(b) = payload.get_mut(at) {
                *b = value;
            }
            let mut reader = MkvReader::new();
            reader.push(&payload);
            for _ in 0..200 {
                match reader.next() {
                    Ok(Some(_)) => {}
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
}
