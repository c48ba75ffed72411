//! Joining the parts of a clip without re-encoding: each part is demuxed by `qtdemux`, its
//! video samples (and audio, track 2, when the clip has it) are re-timed to follow the previous
//! part and appended to one `mp4mux` ([`Muxer`]); the first key frame is kept for the
//! thumbnail. Audio moves with the video by the same shift, so it stays in sync; audio of a
//! part's repeated (skipped) start is skipped with it.

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

/// `appsrc ! mp4mux faststart=true ! filesink` (and a second `appsrc` for the audio when the
/// first part has it), fed with the parts' samples.
pub(super) struct Muxer {
    pipeline: gst::Pipeline,
    src: gst_app::AppSrc,
    audio: Option<gst_app::AppSrc>,
    caps: gst::Caps,
    pub(super) keyframe: Option<Keyframe>,
}

impl Muxer {
    fn new(
        caps: &gst::Caps,
        audio_caps: Option<&gst::Caps>,
        out: &Path,
        faststart: &Path,
    ) -> Result<Muxer> {
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
        let audio = match audio_caps {
            Some(audio_caps) => {
                let asrc = gst_app::AppSrc::builder()
                    .caps(audio_caps)
                    .format(gst::Format::Time)
                    .is_live(false)
                    .block(true)
                    .max_bytes(1024 * 1024)
                    .build();
                pipeline.add(&asrc)?;
                let pad = mux
                    .request_pad_simple("audio_%u")
                    .ok_or_else(|| Error::new(ErrorKind::Pipeline, "mp4mux has no audio pad"))?;
                asrc.static_pad("src")
                    .ok_or_else(|| Error::new(ErrorKind::Internal, "appsrc without a src pad"))?
                    .link(&pad)
                    .map_err(|e| {
                        Error::new(
                            ErrorKind::Pipeline,
                            format!("cannot link the audio to mp4mux: {e:?}"),
                        )
                    })?;
                Some(asrc)
            }
            None => None,
        };
        let muxer = Muxer {
            pipeline,
            src,
            audio,
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

    fn push_audio(&self, buffer: gst::Buffer) -> Result<()> {
        let Some(audio) = &self.audio else {
            return Ok(());
        };
        audio.push_buffer(buffer).map(|_| ()).map_err(|flow| {
            bus_error(&self.pipeline).unwrap_or_else(|| {
                Error::new(
                    ErrorKind::Pipeline,
                    format!("the MP4 muxer refused an audio sample ({flow:?})"),
                )
            })
        })
    }

    /// EOS, then waits until the file is complete.
    pub(super) fn finish(self) -> Result<()> {
        if let Some(audio) = &self.audio {
            audio.end_of_stream().map_err(|flow| {
                Error::new(
                    ErrorKind::Pipeline,
                    format!("the MP4 muxer refused the audio's end of stream ({flow:?})"),
                )
            })?;
        }
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

/// Which track of a part a sample belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Video,
    Audio,
}

/// What the demux thread hands over: the audio track's caps (when its pad appears, before
/// any sample), a sample, or the end of a track.
enum Item {
    AudioTrack(gst::Caps),
    Sample(Kind, gst::Sample),
    Eos(Kind),
}

/// An appsink for one track that hands its samples to `tx` (both tracks' sinks feed one
/// channel, so a full audio queue never waits on a video pull, or the other way round).
fn track_sink(kind: Kind, tx: std::sync::mpsc::SyncSender<Item>) -> gst_app::AppSink {
    let eos_tx = tx.clone();
    let sink = gst_app::AppSink::builder()
        .sync(false)
        .max_buffers(64)
        .drop(false)
        .callbacks(
            gst_app::AppSinkCallbacks::builder()
                .new_sample(move |sink| {
                    let sample = sink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                    tx.send(Item::Sample(kind, sample))
                        .map_err(|_| gst::FlowError::Flushing)?;
                    Ok(gst::FlowSuccess::Ok)
                })
                .eos(move |_| {
                    let _ = eos_tx.send(Item::Eos(kind));
                })
                .build(),
        )
        .build();
    // Not part of the preroll: a part without audio leaves the audio sink without data, which
    // would otherwise hold the pipeline in PAUSED (and the video sink's first buffer with it).
    sink.set_property("async", false);
    sink
}

/// The video samples of the part file `part` (and its audio samples, interleaved by time as
/// `qtdemux` gives them), each with its caps, through `f`.
fn demux(part: &Path, mut f: impl FnMut(Kind, gst::Caps, gst::Buffer) -> Result<()>) -> Result<()> {
    let pipeline = gst::Pipeline::with_name("kvs-clip-demux");
    let src = make_with("filesrc", |b| {
        b.property("location", part.to_string_lossy().into_owned())
    })?;
    let demux = make("qtdemux")?;
    let (tx, rx) = std::sync::mpsc::sync_channel::<Item>(128);
    let video_sink = track_sink(Kind::Video, tx.clone());
    let audio_sink = track_sink(Kind::Audio, tx.clone());
    pipeline.add_many([
        &src,
        &demux,
        video_sink.upcast_ref(),
        audio_sink.upcast_ref(),
    ])?;
    src.link(&demux)?;
    let pad_of = |sink: &gst_app::AppSink| {
        sink.static_pad("sink")
            .ok_or_else(|| Error::new(ErrorKind::Internal, "appsink without a sink pad"))
    };
    let video_pad = pad_of(&video_sink)?;
    let audio_pad = pad_of(&audio_sink)?;
    let audio_linked = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let linked = std::sync::Arc::clone(&audio_linked);
    demux.connect_pad_added(move |_, pad| {
        let name = pad
            .current_caps()
            .or_else(|| Some(pad.query_caps(None)))
            .and_then(|c| c.structure(0).map(|s| s.name().to_string()))
            .unwrap_or_default();
        if name.starts_with("video/") && !video_pad.is_linked() {
            let _ = pad.link(&video_pad);
        } else if name.starts_with("audio/")
            && !audio_pad.is_linked()
            && pad.link(&audio_pad).is_ok()
        {
            linked.store(true, std::sync::atomic::Ordering::SeqCst);
            if let Some(caps) = pad.current_caps() {
                let _ = tx.try_send(Item::AudioTrack(caps));
            }
        }
    });
    let _stop = StopOnDrop(pipeline.clone());
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return Err(bus_error(&pipeline).unwrap_or_else(|| Error::from(e)));
    }
    let mut video_done = false;
    let mut audio_done = false;
    // A part without audio: the audio sink never sees data, but gets EOS with the pipeline.
    loop {
        if video_done && (audio_done || !audio_linked.load(std::sync::atomic::Ordering::SeqCst)) {
            break;
        }
        let item = match rx.recv_timeout(GST_TIMEOUT.into()) {
            Ok(item) => item,
            Err(_) => {
                return Err(bus_error(&pipeline).unwrap_or_else(|| {
                    Error::new(
                        ErrorKind::Timeout,
                        format!("demuxing {} produced nothing in time", part.display()),
                    )
                }));
            }
        };
        let (kind, sample) = match item {
            Item::AudioTrack(caps) => {
                f(Kind::Audio, caps, gst::Buffer::new())?;
                continue;
            }
            Item::Eos(Kind::Video) => {
                video_done = true;
                continue;
            }
            Item::Eos(Kind::Audio) => {
                audio_done = true;
                continue;
            }
            Item::Sample(kind, sample) => (kind, sample),
        };
        let caps = sample
            .caps()
            .ok_or_else(|| Error::new(ErrorKind::Protocol, "a clip sample without caps"))?
            .to_owned();
        let Some(buffer) = sample.buffer_owned() else {
            continue;
        };
        f(kind, caps, buffer)?;
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
    demux(part, |kind, _, buffer| {
        if kind == Kind::Audio {
            return Ok(());
        }
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
    // Audio that comes before the part's first appended video sample: kept until that
    // sample's time (the shift's origin) is known.
    let mut early_audio: Vec<(gst::Caps, gst::Buffer)> = Vec::new();
    let mut audio_caps: Option<gst::Caps> = None;
    demux(part, |kind, caps, buffer| {
        if kind == Kind::Audio {
            audio_caps.get_or_insert_with(|| caps.clone());
            // The track's caps alone (an empty buffer, before any sample).
            if buffer.size() == 0 && buffer.pts().is_none() {
                return Ok(());
            }
            match (origin, muxer.as_ref()) {
                (Some(first), Some(m)) => {
                    push_audio_shifted(m, &buffer, first, offset)?;
                }
                _ => early_audio.push((caps, buffer)),
            }
            return Ok(());
        }
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
            None => {
                // The clip has audio if its first part has (mp4mux takes no pad once data
                // flows): qtdemux adds every pad before the first sample, and interleaves by
                // time, so track 2's caps are known by now when it exists.
                let audio = audio_caps
                    .clone()
                    .or_else(|| early_audio.first().map(|(c, _)| c.clone()));
                Muxer::new(&caps, audio.as_ref(), out, faststart)?
            }
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
        // Audio that waited for the origin: what starts at or after it goes in.
        for (_, a) in early_audio.drain(..) {
            push_audio_shifted(muxer_ref, &a, first, offset)?;
        }
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

/// Appends an audio sample of a part, moved like the part's video (`first` → `offset`); audio
/// before `first` belongs to the part's skipped start and is dropped.
fn push_audio_shifted(
    muxer: &Muxer,
    buffer: &gst::Buffer,
    first: gst::ClockTime,
    offset: gst::ClockTime,
) -> Result<()> {
    let Some(pts) = buffer.pts().or(buffer.dts()) else {
        return Ok(());
    };
    let Some(since) = pts.checked_sub(first) else {
        return Ok(());
    };
    let mut out = buffer.copy();
    {
        let b = out.make_mut();
        b.set_pts(since + offset);
        b.set_dts(since + offset);
    }
    muxer.push_audio(out)
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
