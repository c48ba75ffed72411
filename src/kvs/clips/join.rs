//! Joining the parts of a clip without re-encoding: each part is demuxed by `qtdemux`, its
//! video samples are re-timed to follow the previous part and appended to one `mp4mux`
//! ([`Muxer`]); the first key frame is kept for the thumbnail.

use std::path::Path;

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::GST_TIMEOUT;
use crate::elements::{make, make_with};
use crate::error::{Error, ErrorKind, Result};

/// The first key frame of a clip and its caps, for the thumbnail.
#[derive(Clone)]
pub(super) struct Keyframe {
    pub(super) caps: gst::Caps,
    pub(super) buffer: gst::Buffer,
}

/// `appsrc ! mp4mux faststart=true ! filesink`, fed with the parts' samples.
pub(super) struct Muxer {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    caps: gst::Caps,
    pub(super) keyframe: Option<Keyframe>,
}

impl Muxer {
    fn new(caps: &gst::Caps, out: &Path, faststart: &Path) -> Result<Muxer> {
        let pipeline = gst::Pipeline::with_name("kvs-clip-mux");
        let src = gst_app::AppSrc::builder()
            .caps(caps)
            .format(gst::Format::Time)
            .is_live(false)
            .block(true)
            .max_bytes(2 * 1024 * 1024)
            .build();
        let mux = make_with("mp4mux", |b| {
            b.property("faststart", true)
                .property("faststart-file", faststart.to_string_lossy().into_owned())
        })?;
        let sink = make_with("filesink", |b| {
            b.property("location", out.to_string_lossy().into_owned())
                .property("sync", false)
        })?;
        pipeline.add_many([src.upcast_ref(), &mux, &sink])?;
        // Explicitly the video request pad (a plain link may pick `audio_%u`).
        let video = mux
            .request_pad_simple("video_%u")
            .ok_or_else(|| Error::new(ErrorKind::Pipeline, "mp4mux has no video pad"))?;
        let src_pad = src
            .static_pad("src")
            .ok_or_else(|| Error::new(ErrorKind::Internal, "appsrc without a src pad"))?;
        src_pad.link(&video).map_err(|e| {
            Error::new(ErrorKind::Pipeline, format!("cannot link to mp4mux: {e:?}"))
        })?;
        mux.link(&sink)?;
        let muxer = Muxer {
            pipeline,
            src,
            caps: caps.clone(),
            keyframe: None,
        };
        if let Err(e) = muxer.pipeline.set_state(gst::State::Playing) {
            return Err(bus_error(&muxer.pipeline).unwrap_or_else(|| Error::from(e)));
        }
        Ok(muxer)
    }

    fn push(&self, buffer: gst::Buffer) -> Result<()> {
        self.src.push_buffer(buffer).map(|_| ()).map_err(|flow| {
            bus_error(&self.pipeline).unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Pipeline,
                    format!("the MP4 muxer refused a sample ({flow:?})"),
                )
            })
        })
    }

    /// EOS, then waits until the file is complete.
    pub(super) fn finish(self) -> Result<()> {
        self.src.end_of_stream().map_err(|flow| {
            Error::new(
                ErrorKind::Pipeline,
                format!("the MP4 muxer refused the end of stream ({flow:?})"),
            )
        })?;
        let bus = self
            .pipeline
            .bus()
            .ok_or_else(|| Error::new(ErrorKind::Internal, "pipeline without a bus"))?;
        let msg = bus.timed_pop_filtered(
            GST_TIMEOUT,
            &[gst::MessageType::Eos, gst::MessageType::Error],
        );
        match msg.as_ref().map(|m| m.view()) {
            Some(gst::MessageView::Eos(_)) => Ok(()),
            Some(gst::MessageView::Error(err)) => Err(gst_error(err)),
            _ => Err(Error::new(
                ErrorKind::Timeout,
                "the MP4 muxer did not finish the file in time",
            )),
        }
    }

    fn compatible(&self, caps: &gst::Caps) -> bool {
        let (Some(a), Some(b)) = (self.caps.structure(0), caps.structure(0)) else {
            return false;
        };
        a.name() == b.name()
            && ["codec_data", "width", "height", "stream-format"]
                .iter()
                .all(|&field| {
                    a.value(field).ok().map(|v| v.serialize().ok())
                        == b.value(field).ok().map(|v| v.serialize().ok())
                })
    }
}

impl Drop for Muxer {
    fn drop(&mut self) {
        let _ = self.pipeline.set_state(gst::State::Null);
    }
}

/// One video sample of a part, as the join compares parts: a hash of its bytes and duration.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct SampleKey {
    hash: u64,
    pub(super) keyframe: bool,
}

impl SampleKey {
    fn of(buffer: &gst::BufferRef) -> Result<SampleKey> {
        let map = buffer
            .map_readable()
            .map_err(|_| Error::new(ErrorKind::Pipeline, "a clip sample cannot be mapped"))?;
        let mut hasher = xxhash_rust::xxh3::Xxh3::new();
        hasher.update(map.as_slice());
        hasher.update(
            &buffer
                .duration()
                .map_or(u64::MAX, |d| d.nseconds())
                .to_le_bytes(),
        );
        Ok(SampleKey {
            hash: hasher.digest(),
            keyframe: !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
        })
    }

    /// A key for tests.
    #[cfg(test)]
    pub(super) fn test(hash: u64, keyframe: bool) -> SampleKey {
        SampleKey { hash, keyframe }
    }
}

/// How many leading samples of `next` repeat the end of `prev` (whole fragments: the repeated
/// run starts at a key frame): the longest such run, 0 when none. A later `GetClip` whose range
/// starts before the end of the previous part returns those fragments again.
pub(super) fn overlap(prev: &[SampleKey], next: &[SampleKey]) -> usize {
    let Some(first) = next.first() else {
        return 0;
    };
    if !first.keyframe {
        return 0;
    }
    let start = prev.len().saturating_sub(next.len());
    (start..prev.len())
        .find(|&i| prev[i] == *first && prev[i..] == next[..prev.len() - i])
        .map_or(0, |i| prev.len() - i)
}

/// What one part contributed.
pub(super) struct PartReport {
    /// Samples appended (the part's samples after `skip`).
    pub(super) frames: u64,
    /// Key frames among them.
    pub(super) keyframes: u64,
    /// Presentation span of the appended samples.
    pub(super) duration: gst::ClockTime,
    /// Presentation span of every sample of the part, skipped ones included.
    pub(super) part_duration: gst::ClockTime,
    /// Every sample of the part, skipped ones included.
    pub(super) keys: Vec<SampleKey>,
}

/// The video samples of the part file `part`, in order, each with its caps, through `f`.
fn demux(part: &Path, mut f: impl FnMut(gst::Caps, gst::Buffer) -> Result<()>) -> Result<()> {
    let pipeline = gst::Pipeline::with_name("kvs-clip-demux");
    let src = make_with("filesrc", |b| {
        b.property("location", part.to_string_lossy().into_owned())
    })?;
    let demux = make("qtdemux")?;
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .max_buffers(64)
        .drop(false)
        .build();
    pipeline.add_many([&src, &demux, sink.upcast_ref()])?;
    src.link(&demux)?;
    let sink_pad = sink
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Internal, "appsink without a sink pad"))?;
    demux.connect_pad_added(move |_, pad| {
        let is_video = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().starts_with("video/")))
            .unwrap_or(false);
        if is_video && !sink_pad.is_linked() {
            let _ = pad.link(&sink_pad);
        }
    });
    let _stop = StopOnDrop(pipeline.clone());
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return Err(bus_error(&pipeline).unwrap_or_else(|| Error::from(e)));
    }
    loop {
        let Some(sample) = sink.try_pull_sample(GST_TIMEOUT) else {
            if sink.is_eos() {
                break;
            }
            return Err(bus_error(&pipeline).unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Timeout,
                    format!("demuxing {} produced nothing in time", part.display()),
                )
            }));
        };
        let caps = sample
            .caps()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "a clip sample without caps"))?
            .to_owned();
        let Some(buffer) = sample.buffer_owned() else {
            continue;
        };
        f(caps, buffer)?;
    }
    if let Some(err) = bus_error(&pipeline) {
        return Err(err.context(format!("demuxing {}", part.display())));
    }
    Ok(())
}

/// The samples of a part file, read without appending them.
pub(super) struct PartScan {
    pub(super) keys: Vec<SampleKey>,
    /// Presentation span of the part.
    pub(super) duration: gst::ClockTime,
    /// From the part's first PTS to its last key frame's: where its last fragment starts.
    pub(super) last_keyframe_offset: gst::ClockTime,
}

/// Reads the samples of `part` (to find how much of it a previous part already holds, or
/// how long its last fragment is).
pub(super) fn scan_part(part: &Path) -> Result<PartScan> {
    let mut keys = Vec::new();
    let mut span = Span::default();
    let mut last_keyframe = None;
    demux(part, |_, buffer| {
        let key = SampleKey::of(&buffer)?;
        if key.keyframe {
            last_keyframe = buffer.pts().or(buffer.dts()).or(last_keyframe);
        }
        keys.push(key);
        span.add(&buffer);
        Ok(())
    })?;
    let last_keyframe_offset = match (last_keyframe, span.min_pts) {
        (Some(k), Some(min)) => k.checked_sub(min).unwrap_or(gst::ClockTime::ZERO),
        _ => gst::ClockTime::ZERO,
    };
    Ok(PartScan {
        keys,
        duration: span.duration(),
        last_keyframe_offset,
    })
}

/// A presentation span: the earliest PTS and the latest PTS + duration seen.
#[derive(Default)]
struct Span {
    min_pts: Option<gst::ClockTime>,
    max_end: Option<gst::ClockTime>,
}

impl Span {
    fn add(&mut self, buffer: &gst::BufferRef) {
        if let Some(pts) = buffer.pts().or(buffer.dts()) {
            self.min_pts = Some(self.min_pts.map_or(pts, |m| m.min(pts)));
            let end = pts + buffer.duration().unwrap_or(gst::ClockTime::ZERO);
            self.max_end = Some(self.max_end.map_or(end, |m| m.max(end)));
        }
    }

    fn duration(&self) -> gst::ClockTime {
        match (self.min_pts, self.max_end) {
            (Some(min), Some(max)) => max.checked_sub(min).unwrap_or(gst::ClockTime::ZERO),
            _ => gst::ClockTime::ZERO,
        }
    }
}

/// Demuxes `part` and appends its video samples after the first `skip` to `muxer` (created
/// from the part's caps if `None`), shifted to start at `offset`.
pub(super) fn append_part(
    muxer: Option<Muxer>,
    part: &Path,
    offset: gst::ClockTime,
    skip: usize,
    out: &Path,
    faststart: &Path,
) -> Result<(Option<Muxer>, PartReport)> {
    let mut muxer = muxer;
    let mut origin: Option<gst::ClockTime> = None;
    let mut appended = Span::default();
    let mut whole = Span::default();
    let mut frames = 0u64;
    let mut keyframes = 0u64;
    let mut keys = Vec::new();
    demux(part, |caps, buffer| {
        let key = SampleKey::of(&buffer)?;
        keys.push(key);
        whole.add(&buffer);
        if keys.len() <= skip {
            return Ok(());
        }
        let current = match muxer.take() {
            Some(m) => {
                if frames == 0 && !m.compatible(&caps) {
                    return Err(Error::new(
                        ErrorKind::UnsupportedMedia,
                        format!(
                            "the codec configuration changes inside the clip range (from {} to {}): \
                             one MP4 holds one configuration; request the parts separately",
                            m.caps, caps
                        ),
                    ));
                }
                m
            }
            None => Muxer::new(&caps, out, faststart)?,
        };
        let muxer_ref = muxer.insert(current);
        appended.add(&buffer);
        let pts = buffer.pts().or(buffer.dts());
        let dts = buffer.dts();
        let first = *origin.get_or_insert(dts.or(pts).unwrap_or(gst::ClockTime::ZERO));
        if key.keyframe {
            keyframes += 1;
            if muxer_ref.keyframe.is_none() {
                muxer_ref.keyframe = Some(Keyframe {
                    caps: caps.clone(),
                    buffer: buffer.clone(),
                });
            }
        }
        let shift = |t: Option<gst::ClockTime>| {
            t.map(|t| t.checked_sub(first).unwrap_or(gst::ClockTime::ZERO) + offset)
        };
        let mut out_buffer = buffer.copy();
        {
            let b = out_buffer.make_mut();
            b.set_pts(shift(pts));
            b.set_dts(shift(dts));
        }
        muxer_ref.push(out_buffer)?;
        frames += 1;
        Ok(())
    })?;
    if keys.is_empty() {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("GetClip returned no video samples ({})", part.display()),
        ));
    }
    Ok((
        muxer,
        PartReport {
            frames,
            keyframes,
            duration: appended.duration(),
            part_duration: whole.duration(),
            keys,
        },
    ))
}

/// Sets a pipeline to NULL when dropped.
pub(super) struct StopOnDrop(pub(super) gst::Pipeline);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = self.0.set_state(gst::State::Null);
    }
}

fn gst_error(err: &gst::message::Error) -> Error {
    let e = Error::from(err.error());
    match err.src() {
        Some(src) => e.context(format!("GStreamer element {}", src.path_string())),
        None => e,
    }
}

/// The first error message on the pipeline's bus, if any.
pub(super) fn bus_error(pipeline: &gst::Pipeline) -> Option<Error> {
    let bus = pipeline.bus()?;
    let msg = bus.pop_filtered(&[gst::MessageType::Error])?;
    match msg.view() {
        gst::MessageView::Error(err) => Some(gst_error(err)),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(spec: &str) -> Vec<SampleKey> {
        // 'K3' = key frame with hash 3, 'd4' = delta frame with hash 4.
        spec.split_whitespace()
            .map(|k| SampleKey::test(k[1..].parse().unwrap(), k.starts_with('K')))
            .collect()
    }

    #[test]
    fn overlap_is_the_longest_repeated_run_of_whole_fragments() {
        let prev = keys("K1 d2 d3 K4 d5 d6 K7 d8");
        assert_eq!(overlap(&prev, &keys("K7 d8 K9 d10")), 2);
        assert_eq!(overlap(&prev, &keys("K4 d5 d6 K7 d8 K9")), 5);
        assert_eq!(overlap(&prev, &keys("K9 d10")), 0, "no repeat");
        assert_eq!(
            overlap(&prev, &keys("K4 d5 d6 K9")),
            0,
            "not the end of prev"
        );
        assert_eq!(
            overlap(&prev, &keys("d8 K9")),
            0,
            "starts inside a fragment"
        );
        assert_eq!(
            overlap(&prev, &prev.clone()),
            prev.len(),
            "the same part again"
        );
        assert_eq!(overlap(&[], &keys("K1")), 0);
        assert_eq!(overlap(&prev, &[]), 0);
        // Identical fragments (a static picture): the longest run.
        let same = keys("K1 d2 K1 d2");
        assert_eq!(overlap(&same, &keys("K1 d2 K1 d2 K5")), 4);
    }
}
