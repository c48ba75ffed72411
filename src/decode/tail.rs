//! The tail both heads share: the target-fps probe, colour conversion and scaling (or JPEG),
//! and the appsink that hands out zero-copy frames with their producer time.

use super::*;
use crate::frame::{FrameGeometry, ResizeMode};

/// What the shared tail needs for raw output (`tail_elements` adds JPEG's).
pub(super) const RAW_TAIL_ELEMENTS: &[&str] =
    &["videoconvert", "videoscale", "capsfilter", "appsink"];
pub(super) const JPEG_TAIL_ELEMENTS: &[&str] = &["jpegenc"];

/// The elements of the shared tail for `format`.
pub(crate) fn tail_elements(format: PixelFormat) -> Vec<&'static str> {
    let mut all = RAW_TAIL_ELEMENTS.to_vec();
    if !format.is_raw() {
        all.extend_from_slice(JPEG_TAIL_ELEMENTS);
    }
    all
}

/// How the tail gives a frame its producer time and fragment, from the frame's PTS and the
/// sender's NTP time when the buffer carried a reference timestamp (RTSP).
pub(crate) type Stamp = Box<
    dyn Fn(Option<Duration>, Option<SystemTime>) -> (Option<SystemTime>, Option<FragmentId>)
        + Send
        + Sync,
>;

/// What the tail needs from the head that feeds it.
pub(crate) struct TailHooks {
    pub stamp: Stamp,
    /// Called when end-of-stream reaches the appsink.
    pub on_eos: Box<dyn Fn() + Send + Sync>,
}

/// Seconds between the NTP epoch (1900) and the Unix epoch (1970).
pub(super) const NTP_UNIX_OFFSET: Duration = Duration::from_secs(2_208_988_800);

/// An NTP time as GStreamer carries it (nanoseconds since 1900) → wall time.
pub(crate) fn ntp_to_system_time(ntp_ns: u64) -> Option<SystemTime> {
    Duration::from_nanos(ntp_ns)
        .checked_sub(NTP_UNIX_OFFSET)
        .and_then(|d| SystemTime::UNIX_EPOCH.checked_add(d))
}

/// The sender's NTP time of a buffer, from a `GstReferenceTimestampMeta` with caps
/// `timestamp/x-ntp` (added by `rtpjitterbuffer` once RTCP sender reports arrived).
pub(crate) fn ntp_reference(buffer: &gst::BufferRef) -> Option<SystemTime> {
    buffer
        .iter_meta::<gst::ReferenceTimestampMeta>()
        .find(|meta| {
            meta.reference()
                .structure(0)
                .is_some_and(|s| s.name() == "timestamp/x-ntp")
        })
        .and_then(|meta| {
            // SAFETY: the pointer is the meta itself, alive while `meta` borrows the buffer.
            // The field is read directly because the binding's `timestamp()` panics on
            // GST_CLOCK_TIME_NONE (u64::MAX), which is checked here instead.
            let raw = unsafe { (*meta.as_ptr()).timestamp };
            (raw != u64::MAX).then_some(raw)
        })
        .and_then(ntp_to_system_time)
}

/// What the converter probe saw of a frame that the appsink will deliver (an encoder such as
/// `jpegenc` drops the delta flag and may drop metas).
#[derive(Clone, Copy)]
pub(super) struct Seen {
    pts: Option<gst::ClockTime>,
    key_frame: bool,
    reference: Option<SystemTime>,
}

/// Adds the shared tail to `pipeline`, fed by the decoded video pads of `head` (a bin of
/// [`super::head`] already in the pipeline):
///
/// ```text
/// head: [decoder sink probe: key flags; key-frame-only drops delta units] decoder ─┐
///   ┌──────────────────────────────────────────────────────────────────────────────┘
///   └▶ [target-fps probe] videoconvert → videoscale → appsink (format [, width, height])
///                         videoconvert → videoscale → capsfilter ([width, height]) → jpegenc → appsink (image/jpeg)
/// ```
///
/// Frames leave the appsink without a copy, stamped by `hooks.stamp`; errors are the head's
/// business ([`on_bus_error`]).
pub(crate) fn add_tail(
    pipeline: &gst::Pipeline,
    head: &gst::Element,
    config: &DecodeConfig,
    sink: &Arc<dyn FrameSink>,
    hooks: TailHooks,
) -> Result<()> {
    config.pixel_format.validate()?;
    let convert = element("videoconvert")?;
    let scale = element("videoscale")?;
    let mut chain = vec![convert.clone(), scale];
    // The RGB family converted here (SIMD, pooled): the appsink takes the decoder's 4:2:0 as
    // is (videoconvert in passthrough; scaling happens in YUV).
    let letterbox = match (config.resize, config.resize_mode) {
        (Some(size), ResizeMode::Letterbox { color }) => Some((size, color)),
        _ => None,
    };
    let converter = convert::converts(config.conversion, config.pixel_format)
        .then(|| Arc::new(convert::Converter::new(config.pixel_format, letterbox)));
    // Stretch: the appsink's caps fix the size. Fit and letterbox: the size follows the
    // picture's aspect ratio, set on `fit_filter` when the decoder's caps are known.
    let stretch = config
        .resize
        .filter(|_| config.resize_mode == ResizeMode::Stretch);
    let mut fit_filter: Option<gst::Element> = None;
    let appsink_caps = match (config.pixel_format, config.pixel_format.video_format()) {
        (_, Some(_)) if converter.is_some() => {
            let mut caps = gst_video::VideoCapsBuilder::new().format_list(convert::NATIVE_FORMATS);
            if let Some((w, h)) = stretch {
                caps = caps.width(w as i32).height(h as i32);
            }
            caps.build()
        }
        (_, Some(format)) => {
            let mut caps = gst_video::VideoCapsBuilder::new().format(format);
            if let Some((w, h)) = stretch {
                caps = caps.width(w as i32).height(h as i32);
            }
            caps.build()
        }
        (PixelFormat::Jpeg { quality }, None) => {
            let mut size = gst_video::VideoCapsBuilder::new();
            if let Some((w, h)) = stretch {
                size = size.width(w as i32).height(h as i32);
            }
            let filter =
                crate::elements::make_with("capsfilter", |b| b.property("caps", size.build()))?;
            if config.resize.is_some() && stretch.is_none() {
                fit_filter = Some(filter.clone());
            }
            let jpegenc = crate::elements::make_with("jpegenc", |b| {
                b.property("quality", i32::from(quality))
            })?;
            chain.push(filter);
            chain.push(jpegenc);
            gst::Caps::builder("image/jpeg").build()
        }
        (raw, None) => {
            return Err(Error::new(
                ErrorKind::Internal,
                format!("no GStreamer format for {raw}"),
            ));
        }
    };
    if config.resize.is_some() && stretch.is_none() && fit_filter.is_none() {
        let filter = crate::elements::make("capsfilter")?;
        chain.push(filter.clone());
        fit_filter = Some(filter);
    }
    let appsink = gst_app::AppSink::builder()
        .name("sink")
        .caps(&appsink_caps)
        .sync(false)
        .max_buffers(2)
        .build();
    for e in &chain {
        pipeline.add(e).map_err(Error::from)?;
    }
    pipeline.add(&appsink).map_err(Error::from)?;
    chain.push(appsink.clone().upcast());
    gst::Element::link_many(chain.iter()).map_err(Error::from)?;

    if converter.is_some() {
        accept_video_meta(&appsink)?;
    }

    let convert_sink = convert
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "videoconvert has no sink pad"))?;
    link_decoded_video(head, convert_sink.clone());
    // The decoded picture's size: each frame's geometry, and (fit, letterbox) the size the
    // scaler makes of it.
    let geometry: Arc<Mutex<Option<FrameGeometry>>> = Arc::new(Mutex::new(None));
    {
        let geometry = Arc::clone(&geometry);
        let (resize, mode) = (config.resize, config.resize_mode);
        convert_sink.add_probe(gst::PadProbeType::EVENT_DOWNSTREAM, move |_, info| {
            if let Some(gst::PadProbeData::Event(event)) = &info.data
                && let gst::EventView::Caps(c) = event.view()
                && let Ok(video) = gst_video::VideoInfo::from_caps(c.caps())
            {
                let par = video.par();
                let g = match resize {
                    Some(size) => FrameGeometry::resized(
                        video.width(),
                        video.height(),
                        (par.numer(), par.denom()),
                        size,
                        mode,
                    ),
                    None => FrameGeometry::identity(video.width(), video.height()),
                };
                if let Some(filter) = &fit_filter {
                    let caps = gst_video::VideoCapsBuilder::new()
                        .width(g.content_width as i32)
                        .height(g.content_height as i32)
                        .pixel_aspect_ratio(gst::Fraction::new(1, 1))
                        .build();
                    filter.set_property("caps", caps);
                }
                *geometry.lock() = Some(g);
            }
            gst::PadProbeReturn::Ok
        });
    }
    // Decoders (avdec_* in GStreamer 1.22) do not mark their output as key or delta: the
    // flag is noted, by PTS, where the demuxer or depayloader set it.
    let keys: KeyFlags = Arc::new(Mutex::new(VecDeque::new()));
    watch_decoders(
        head,
        Arc::clone(&keys),
        config.key_frames_only,
        config.decoder_threads,
    );
    let active = ActiveDecoder::new();

    // target_fps: keep a frame when at least 1/fps has passed (in stream time) since the last
    // kept. Then note what the appsink cannot see any more (key flag, NTP time).
    let min_gap = config.target_fps.map(|fps| {
        // Tolerate timestamp jitter of a millisecond.
        Duration::from_secs_f64(1.0 / fps).saturating_sub(Duration::from_millis(1))
    });
    let last: Mutex<Option<gst::ClockTime>> = Mutex::new(None);
    let seen: Arc<Mutex<VecDeque<Seen>>> = Arc::new(Mutex::new(VecDeque::new()));
    let probe_seen = Arc::clone(&seen);
    let drop_sink = Arc::clone(sink);
    convert_sink.add_probe(gst::PadProbeType::BUFFER, move |_, info| {
        let Some(buffer) = info.buffer() else {
            return gst::PadProbeReturn::Ok;
        };
        let pts = buffer.pts();
        if let (Some(min_gap), Some(pts)) = (min_gap, pts) {
            let mut last = last.lock();
            match *last {
                Some(prev)
                    if pts > prev
                        && pts - prev
                            < gst::ClockTime::from_nseconds(min_gap.as_nanos() as u64) =>
                {
                    drop(last);
                    drop_sink.dropped(DecoderDrop::TargetFps);
                    return discard(info);
                }
                _ => *last = Some(pts),
            }
        }
        let noted_key = pts.and_then(|pts| {
            let mut keys = keys.lock();
            let i = keys.iter().position(|(p, _)| *p == pts)?;
            keys.remove(i).map(|(_, key)| key)
        });
        let entry = Seen {
            pts,
            key_frame: noted_key
                .unwrap_or_else(|| !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT)),
            reference: ntp_reference(buffer),
        };
        let mut seen = probe_seen.lock();
        seen.push_back(entry);
        while seen.len() > 32 {
            seen.pop_front();
        }
        gst::PadProbeReturn::Ok
    });

    // Frames out of the appsink, without a copy.
    let frame_sink = Arc::clone(sink);
    let format = config.pixel_format;
    let max_frame_age = config.max_frame_age;
    let TailHooks { stamp, on_eos } = hooks;
    let frame_geometry = geometry;
    // Without the converter (which keeps its own layout per caps), the frame's layout: parsed
    // once per caps object, not per frame.
    let parsed: Mutex<Option<(gst::Caps, Layout)>> = Mutex::new(None);
    appsink.set_callbacks(
        gst_app::AppSinkCallbacks::builder()
            .new_sample(move |appsink| {
                // The pipeline counts as a live decoder while this callback lives.
                let _alive = &active;
                let sample = appsink.pull_sample().map_err(|_| gst::FlowError::Eos)?;
                // A reference to the sample's caps (same object): the layout caches compare it
                // by address. (`CapsRef::to_owned` would copy it, and never match.)
                let Some(caps) = sample.caps_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let Some(buffer) = sample.buffer_owned() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let buffer_pts = buffer.pts();
                let pts = buffer_pts.map(|t| Duration::from_nanos(t.nseconds()));
                let noted = {
                    let mut seen = seen.lock();
                    match seen.iter().position(|s| s.pts == buffer_pts) {
                        Some(i) => {
                            let noted = seen.get(i).copied();
                            seen.drain(..=i);
                            noted
                        }
                        None => None,
                    }
                };
                let key_frame = noted.map_or_else(
                    || !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT),
                    |s| s.key_frame,
                );
                let reference = ntp_reference(&buffer).or(noted.and_then(|s| s.reference));
                let (producer_time, fragment) = stamp(pts, reference);
                // The live edge: a frame already too old is not converted, nor delivered.
                if let (Some(max_age), Some(produced)) = (max_frame_age, producer_time)
                    && SystemTime::now()
                        .duration_since(produced)
                        .is_ok_and(|age| age > max_age)
                {
                    frame_sink.dropped(DecoderDrop::TooOld);
                    return Ok(gst::FlowSuccess::Ok);
                }
                // The colour conversion is left to the queue (`Frame::finish`: at once for a
                // waiting reader, else when the frame is taken); its layout is checked here.
                let (info, width, height, pending) = match &converter {
                    Some(converter) => match converter.output_info(&caps) {
                        Ok(info) => {
                            let (w, h) = (info.width(), info.height());
                            let pending = convert::Pending::new(Arc::clone(converter), caps);
                            (Some(info), w, h, Some(pending))
                        }
                        Err(convert::ConvertError(why)) => {
                            tracing::warn!(%why, "colour conversion failed: frame dropped");
                            return Ok(gst::FlowSuccess::Ok);
                        }
                    },
                    None => {
                        let Some((info, w, h)) = cached_layout(&parsed, format, &caps) else {
                            return Ok(gst::FlowSuccess::Ok);
                        };
                        (info, w, h, None)
                    }
                };
                let Ok(map) = buffer.into_mapped_buffer_readable() else {
                    return Ok(gst::FlowSuccess::Ok);
                };
                let geometry = frame_geometry
                    .lock()
                    .unwrap_or(FrameGeometry::identity(width, height));
                frame_sink.frame(Frame {
                    map,
                    info,
                    width,
                    height,
                    format,
                    producer_time,
                    pts,
                    emitted: SystemTime::now(),
                    sequence: 0,
                    fragment,
                    key_frame,
                    geometry,
                    pending,
                });
                Ok(gst::FlowSuccess::Ok)
            })
            .eos(move |_| on_eos())
            .build(),
    );
    Ok(())
}

/// Tells upstream that the appsink reads frames through their `GstVideoMeta` (strides and
/// plane offsets other than the caps' defaults), as the converter does.
///
/// Without it `avdec_*` does not hand out the padded pictures libavcodec decodes into: it
/// copies each into a buffer of the caps' layout (`av_frame_copy`). With it, where the coded
/// size equals the picture's (720p; not 360p or 1080p, coded as 368 and 1088 lines), the
/// decoded picture itself goes downstream, but GStreamer 1.22's video decoder base class then
/// copies it when it makes the buffer writable (libav keeps it mapped as a reference picture):
/// each frame is copied once at every size. Only with the converter: frames handed
/// out as I420/NV12 are described by their caps alone.
fn accept_video_meta(appsink: &gst_app::AppSink) -> Result<()> {
    let pad = appsink
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "appsink has no sink pad"))?;
    pad.add_probe(gst::PadProbeType::QUERY_DOWNSTREAM, |_, info| {
        if let Some(query) = info.query_mut()
            && let gst::QueryViewMut::Allocation(allocation) = query.view_mut()
            && allocation
                .find_allocation_meta::<gst_video::VideoMeta>()
                .is_none()
        {
            allocation.add_allocation_meta::<gst_video::VideoMeta>(None);
        }
        gst::PadProbeReturn::Ok
    });
    Ok(())
}

/// [`frame_layout`] of `caps`, parsed once per caps object (they change only on renegotiation).
fn cached_layout(
    parsed: &Mutex<Option<(gst::Caps, Layout)>>,
    format: PixelFormat,
    caps: &gst::Caps,
) -> Option<Layout> {
    let mut parsed = parsed.lock();
    if let Some((c, layout)) = parsed.as_ref()
        && c.as_ptr() == caps.as_ptr()
    {
        return Some(layout.clone());
    }
    let layout = frame_layout(format, caps)?;
    *parsed = Some((caps.clone(), layout.clone()));
    Some(layout)
}

/// Video info (raw formats) and size of frames with `caps`; None when the caps are unusable.
/// Video info (raw formats only), width, height.
pub(super) type Layout = (Option<gst_video::VideoInfo>, u32, u32);

pub(super) fn frame_layout(format: PixelFormat, caps: &gst::CapsRef) -> Option<Layout> {
    if format.is_raw() {
        let info = gst_video::VideoInfo::from_caps(caps).ok()?;
        let (w, h) = (info.width(), info.height());
        return Some((Some(info), w, h));
    }
    let s = caps.structure(0)?;
    let w = s
        .get::<i32>("width")
        .ok()
        .and_then(|w| u32::try_from(w).ok())
        .unwrap_or(0);
    let h = s
        .get::<i32>("height")
        .ok()
        .and_then(|h| u32::try_from(h).ok())
        .unwrap_or(0);
    Some((None, w, h))
}
