//! The JPEG of a clip's first frame: its first key frame decoded once by GStreamer.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;

use super::GST_TIMEOUT;
use super::join::{Keyframe, StopOnDrop, bus_error};
use crate::elements::make;
use crate::error::{Error, ErrorKind, Result};

/// The JPEG of the clip's first frame.
pub(super) async fn thumbnail(keyframe: Option<Keyframe>) -> Result<Vec<u8>> {
    let keyframe = keyframe.ok_or_else(|| {
        Error::new(
            ErrorKind::Decode,
            "the clip has no key frame to make a thumbnail from",
        )
    })?;
    tokio::task::spawn_blocking(move || encode_jpeg(&keyframe))
        .await
        .map_err(|e| Error::new(ErrorKind::Internal, format!("thumbnail task: {e}")))?
}

/// `appsrc ! h264parse ! avdec_h264 ! videoconvert ! jpegenc ! appsink` (h265parse/avdec_h265
/// for H.265) over one key frame.
fn encode_jpeg(keyframe: &Keyframe) -> Result<Vec<u8>> {
    let name = keyframe
        .caps
        .structure(0)
        .map(|s| s.name().to_string())
        .unwrap_or_default();
    let (parser, decoder) = match name.as_str() {
        "video/x-h264" => ("h264parse", "avdec_h264"),
        "video/x-h265" => ("h265parse", "avdec_h265"),
        other => {
            return Err(Error::new(
                ErrorKind::UnsupportedMedia,
                format!("no thumbnail decoder for {other}"),
            ));
        }
    };
    let pipeline = gst::Pipeline::with_name("kvs-clip-thumbnail");
    let src = gst_app::AppSrc::builder()
        .caps(&keyframe.caps)
        .format(gst::Format::Time)
        .build();
    let parse = make(parser)?;
    let decode = make(decoder)?;
    let convert = make("videoconvert")?;
    let jpeg = make("jpegenc")?;
    let sink = gst_app::AppSink::builder().sync(false).build();
    pipeline.add_many([
        src.upcast_ref(),
        &parse,
        &decode,
        &convert,
        &jpeg,
        sink.upcast_ref(),
    ])?;
    gst::Element::link_many([
        src.upcast_ref(),
        &parse,
        &decode,
        &convert,
        &jpeg,
        sink.upcast_ref(),
    ])?;
    let _stop = StopOnDrop(pipeline.clone());
    if let Err(e) = pipeline.set_state(gst::State::Playing) {
        return Err(bus_error(&pipeline).unwrap_or_else(|| Error::from(e)));
    }
    let mut buffer = keyframe.buffer.copy();
    {
        let b = buffer.make_mut();
        b.set_pts(gst::ClockTime::ZERO);
        b.set_dts(gst::ClockTime::ZERO);
    }
    let pushed = src.push_buffer(buffer).and_then(|_| src.end_of_stream());
    if let Err(flow) = pushed {
        return Err(bus_error(&pipeline).unwrap_or_else(|| {
            Error::new(
                ErrorKind::Decode,
                format!("thumbnail decoder refused the frame ({flow:?})"),
            )
        }));
    }
    let sample = sink.try_pull_sample(GST_TIMEOUT).ok_or_else(|| {
        bus_error(&pipeline).unwrap_or_else(|| {
            Error::new(ErrorKind::Decode, "the thumbnail decoder produced no frame")
        })
    })?;
    let buffer = sample
        .buffer()
        .ok_or_else(|| Error::new(ErrorKind::Decode, "empty thumbnail sample"))?;
    let map = buffer
        .map_readable()
        .map_err(|e| Error::new(ErrorKind::Decode, format!("thumbnail buffer: {e}")))?;
    Ok(map.as_slice().to_vec())
}
