//! The camera's GStreamer pipeline: appsrc → textoverlay → x264enc → h264parse → appsink (or
//! x265enc → h265parse),
//! the per-buffer overlay text and the bus checks.

use gstreamer as gst;
use gstreamer::prelude::*;
use gstreamer_app as gst_app;
use tracing::warn;

use super::config::CameraConfig;
use super::pipeline_error;
use super::render::Layout;
use super::timing::{Timing, label};
use crate::error::Result;

/// Font family of the text overlay (monospaced, so the line length is predictable).
const FONT_FAMILY: &str = "DejaVu Sans Mono";

/// The GStreamer pipeline; set to `Null` when dropped.
pub(super) struct Pipeline {
    /// The pipeline.
    pub(super) pipeline: gst::Pipeline,
    /// Where the rendered pictures go in.
    pub(super) appsrc: gst_app::AppSrc,
    /// The text overlay (font and position change with the resolution).
    overlay: gst::Element,
    /// Where the encoded access units come out.
    pub(super) appsink: gst_app::AppSink,
    /// The pipeline's bus.
    bus: gst::Bus,
}

impl Drop for Pipeline {
    fn drop(&mut self) {
        if let Err(e) = self.pipeline.set_state(gst::State::Null) {
            warn!("camera: setting the pipeline to Null failed: {e}");
        }
    }
}

/// Makes element `factory` or fails with a message naming it and its Debian package.
pub(super) fn make(factory: &str) -> Result<gst::Element> {
    crate::elements::make(factory).map_err(|e| pipeline_error(format!("camera: {e}")))
}

impl Pipeline {
    /// Builds the pipeline for `cfg` with the first pictures' caps `raw_caps`.
    pub(super) fn build(cfg: &CameraConfig, timing: Timing, raw_caps: &gst::Caps) -> Result<Self> {
        let appsrc = gst_app::AppSrc::builder()
            .name("camera-src")
            .caps(raw_caps)
            .format(gst::Format::Time)
            .is_live(true)
            .build();
        let overlay = make("textoverlay")?;
        overlay.set_property("auto-resize", false);
        overlay.set_property("shaded-background", false);
        overlay.set_property_from_str("valignment", "top");
        overlay.set_property_from_str("halignment", "left");
        overlay.set_property_from_str("wrap-mode", "none");
        let f = cfg.frames_per_fragment;
        // One GOP per fragment, closed, no scene cuts, no B-frames, no lookahead: one encoded
        // access unit out per picture in.
        let (encoder, parser, coded_caps) = match cfg.codec {
            crate::VideoCodec::H264 => {
                let encoder = make("x264enc")?;
                encoder.set_property_from_str("speed-preset", "ultrafast");
                encoder.set_property("bitrate", cfg.bitrate_kbps);
                encoder.set_property("key-int-max", f);
                if cfg.b_frames == 0 {
                    encoder.set_property_from_str("tune", "zerolatency");
                    encoder.set_property(
                        "option-string",
                        format!("scenecut=0:keyint={f}:min-keyint={f}"),
                    );
                } else {
                    // Fixed B-frame runs in closed GOPs, one thread and no lookahead: the
                    // encoder holds back at most `b_frames` pictures.
                    encoder.set_property("bframes", cfg.b_frames);
                    encoder.set_property("b-adapt", false);
                    encoder.set_property("threads", 1u32);
                    encoder.set_property("rc-lookahead", 0i32);
                    encoder.set_property("sync-lookahead", 0i32);
                    encoder.set_property(
                        "option-string",
                        format!(
                            "scenecut=0:keyint={f}:min-keyint={f}:b-pyramid=none:open-gop=0:sliced-threads=0"
                        ),
                    );
                }
                let caps = gst::Caps::builder("video/x-h264")
                    .field("stream-format", "avc")
                    .field("alignment", "au")
                    .build();
                (encoder, make("h264parse")?, caps)
            }
            crate::VideoCodec::H265 => {
                let encoder = make("x265enc")?;
                encoder.set_property_from_str("tune", "zerolatency");
                encoder.set_property_from_str("speed-preset", "ultrafast");
                encoder.set_property("bitrate", cfg.bitrate_kbps);
                encoder.set_property("key-int-max", i32::try_from(f).unwrap_or(i32::MAX));
                encoder.set_property(
                    "option-string",
                    format!(
                        "scenecut=0:keyint={f}:min-keyint={f}:open-gop=0:bframes=0:repeat-headers=1"
                    ),
                );
                let caps = gst::Caps::builder("video/x-h265")
                    .field("stream-format", "hvc1")
                    .field("alignment", "au")
                    .build();
                (encoder, make("h265parse")?, caps)
            }
        };
        let appsink = gst_app::AppSink::builder()
            .name("camera-sink")
            .caps(&coded_caps)
            .sync(false)
            .build();
        let pipeline = gst::Pipeline::with_name(&format!("camera-{}", cfg.name));
        let elements = [
            appsrc.upcast_ref::<gst::Element>(),
            &overlay,
            &encoder,
            &parser,
            appsink.upcast_ref::<gst::Element>(),
        ];
        pipeline
            .add_many(elements)
            .map_err(|e| pipeline_error(format!("camera {}: add elements: {e}", cfg.name)))?;
        gst::Element::link_many(elements)
            .map_err(|e| pipeline_error(format!("camera {}: link elements: {e}", cfg.name)))?;
        Self::install_label_probe(&overlay, cfg.name.clone(), timing)?;
        let bus = pipeline
            .bus()
            .ok_or_else(|| pipeline_error(format!("camera {}: pipeline without bus", cfg.name)))?;
        Ok(Self {
            pipeline,
            appsrc,
            overlay,
            appsink,
            bus,
        })
    }

    /// Sets the overlay text of every picture right before `textoverlay` draws it, from the
    /// picture's own PTS: the text always matches the frame it is drawn on.
    fn install_label_probe(overlay: &gst::Element, name: String, timing: Timing) -> Result<()> {
        let pad = overlay
            .static_pad("video_sink")
            .ok_or_else(|| pipeline_error("camera: textoverlay has no video_sink pad"))?;
        let name = gst::glib::markup_escape_text(&name).to_string();
        pad.add_probe(gst::PadProbeType::BUFFER, move |pad, info| {
            if let (Some(pts), Some(overlay)) = (
                info.buffer().and_then(|buffer| buffer.pts()),
                pad.parent_element(),
            ) {
                let n = timing.frame_of_pts(pts);
                overlay.set_property("text", label(&name, n, timing.producer_time(n)));
            }
            gst::PadProbeReturn::Ok
        })
        .ok_or_else(|| pipeline_error("camera: cannot install the overlay probe"))?;
        Ok(())
    }

    /// Places the overlay text for `layout`.
    pub(super) fn apply_layout(&self, layout: &Layout) {
        self.overlay
            .set_property("font-desc", format!("{FONT_FAMILY} {}px", layout.font_px));
        self.overlay
            .set_property("xpad", i32::try_from(layout.xpad).unwrap_or(0));
        self.overlay
            .set_property("ypad", i32::try_from(layout.strip + 1).unwrap_or(0));
    }

    /// Logs bus warnings and turns the first bus error into an `Err`.
    pub(super) fn check_bus(&self, name: &str) -> Result<()> {
        while let Some(message) = self
            .bus
            .pop_filtered(&[gst::MessageType::Error, gst::MessageType::Warning])
        {
            let source = message
                .src()
                .map(|s| s.path_string().to_string())
                .unwrap_or_default();
            match message.view() {
                gst::MessageView::Error(err) => {
                    return Err(pipeline_error(format!(
                        "camera {name}: GStreamer error from {source}: {} ({})",
                        err.error(),
                        err.debug().map(|d| d.to_string()).unwrap_or_default()
                    )));
                }
                gst::MessageView::Warning(w) => {
                    warn!(
                        camera = name,
                        "GStreamer warning from {source}: {} ({})",
                        w.error(),
                        w.debug().map(|d| d.to_string()).unwrap_or_default()
                    );
                }
                _ => {}
            }
        }
        Ok(())
    }
}
