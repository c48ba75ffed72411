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

/// What one part contributed.
pub(super) struct PartReport {
    pub(super) frames: u64,
    /// Presentation span of its samples.
    pub(super) duration: gst::ClockTime,
}

/// Demuxes `part` and appends its video samples to `muxer` (created from the part's caps if
/// `None`), shifted to start at `offset`.
pub(super) fn append_part(
    muxer: Option<Muxer>,
    part: &Path,
    offset: gst::ClockTime,
    out: &Path,
    faststart: &Path,
) -> Result<(Muxer, PartReport)> {
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
    let mut muxer = muxer;
    let mut origin: Option<gst::ClockTime> = None;
    let mut min_pts: Option<gst::ClockTime> = None;
    let mut max_end: Option<gst::ClockTime> = None;
    let mut frames = 0u64;
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
        let pts = buffer.pts().or(buffer.dts());
        let dts = buffer.dts();
        let first = *origin.get_or_insert(dts.or(pts).unwrap_or(gst::ClockTime::ZERO));
        if let Some(pts) = pts {
            min_pts = Some(min_pts.map_or(pts, |m| m.min(pts)));
            let end = pts + buffer.duration().unwrap_or(gst::ClockTime::ZERO);
            max_end = Some(max_end.map_or(end, |m| m.max(end)));
        }
        if muxer_ref.keyframe.is_none() && !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT) {
            muxer_ref.keyframe = Some(Keyframe {
                caps: caps.clone(),
                buffer: buffer.clone(),
            });
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
    }
    if let Some(err) = bus_error(&pipeline) {
        return Err(err.context(format!("demuxing {}", part.display())));
    }
    let Some(muxer) = muxer else {
        return Err(Error::new(
            ErrorKind::Protocol,
            format!("GetClip returned no video samples ({})", part.display()),
        ));
    };
    let duration = match (min_pts, max_end) {
        (Some(min), Some(max)) => max.checked_sub(min).unwrap_or(gst::ClockTime::ZERO),
        _ => gst::ClockTime::ZERO,
    };
    Ok((muxer, PartReport { frames, duration }))
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
