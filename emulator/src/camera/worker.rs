//! The camera thread's loop: paces the frames, pushes the rendered pictures, pulls the encoded
//! access units, assembles them into fragments and delivers them.

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use gstreamer as gst;
use tracing::{debug, info, warn};

use super::pipeline::Pipeline;
use super::render::{Layout, Renderer};
use super::timing::Timing;
use super::{CameraEvent, EncodedFragment, LiveSample, Shared, pipeline_error};
use crate::error::Result;
use crate::mp4::{Sample, VideoTrack};

/// Longest wait for one pull from the appsink before the stop flag and the bus are checked again.
const PULL_SLICE_MS: u64 = 20;

/// How long the encoder may take for one frame before the camera gives up.
const OUTPUT_TIMEOUT: Duration = Duration::from_secs(10);

/// A fragment being assembled.
pub(super) struct PartialFragment {
    /// Its index.
    index: u64,
    /// Its first frame.
    first_frame: u64,
    /// The track of its first sample.
    track: Option<Arc<VideoTrack>>,
    /// Its samples so far.
    samples: Vec<Sample>,
}

/// The camera thread's state.
pub(super) struct Worker<F> {
    /// Stream name (for logs and the picture).
    pub(super) name: String,
    /// Frames per fragment.
    pub(super) frames_per_fragment: u64,
    /// Frame timing.
    pub(super) timing: Timing,
    /// The pipeline.
    pub(super) pipe: Pipeline,
    /// The current renderer (changes with the resolution).
    pub(super) renderer: Renderer,
    /// Characters in the overlay text (for the font size).
    pub(super) label_chars: usize,
    /// Shared state.
    pub(super) shared: Arc<Shared>,
    /// Receives each access unit as it is encoded, and the finished fragments.
    pub(super) on_event: F,
    /// Caps of the last encoded sample.
    pub(super) last_caps: Option<gst::Caps>,
    /// Track of the last encoded sample.
    pub(super) track: Option<Arc<VideoTrack>>,
    /// The fragments being assembled, oldest first (more than one while the encoder holds
    /// back the last pictures of a GOP).
    pub(super) open: std::collections::VecDeque<PartialFragment>,
    /// Pictures the encoder may hold back (0 without B-frames).
    pub(super) lag: u64,
    /// How composition offsets are written.
    pub(super) offsets: crate::CompositionOffsets,
    /// Index of the next fragment.
    pub(super) next_index: u64,
    /// Stop at the first fragment boundary at or after this frame.
    pub(super) max_frames: Option<u64>,
}

impl<F: FnMut(CameraEvent)> Worker<F> {
    /// Renders, encodes and delivers until stopped or failed.
    ///
    /// Pictures go in at their producer time; access units come out in decode order, `lag`
    /// pictures behind with B-frames (the encoder holds them back), and each goes to the
    /// fragment (GOP) its picture belongs to, which is delivered once it has all its samples.
    pub(super) fn run(&mut self) -> Result<()> {
        let mut n: u64 = 0;
        let mut pulled: u64 = 0;
        loop {
            if n.is_multiple_of(self.frames_per_fragment) {
                if self.max_frames.is_some_and(|max| n >= max) {
                    // What the encoder still holds comes out at the end of the stream.
                    if pulled < n {
                        let _ = self.pipe.appsrc.end_of_stream();
                        while pulled < n {
                            let Some(sample) = self.pull_output()? else {
                                return Ok(());
                            };
                            self.take_sample(&sample)?;
                            pulled += 1;
                        }
                    }
                    info!(
                        camera = self.name.as_str(),
                        frames = n,
                        "camera finished (no live video)"
                    );
                    return Ok(());
                }
                self.apply_pending_resolution()?;
                self.open.push_back(PartialFragment {
                    index: self.next_index,
                    first_frame: n,
                    track: None,
                    samples: Vec::with_capacity(self.frames_per_fragment as usize),
                });
                self.next_index += 1;
            }
            if !self.shared.wait_until(self.timing.producer_time(n)) {
                return Ok(());
            }
            self.push_frame(n)?;
            n += 1;
            // Every access unit but those of the last `lag` pictures is due now.
            while pulled + self.lag < n {
                let Some(sample) = self.pull_output()? else {
                    return Ok(());
                };
                pulled += 1;
                self.shared.frames.store(pulled, Ordering::Relaxed);
                self.take_sample(&sample)?;
                #[cfg(test)]
                if self.shared.inject_error.swap(false, Ordering::Relaxed) {
                    gst::element_error!(self.pipe.appsrc, gst::CoreError::Failed, ["injected"]);
                }
                self.pipe.check_bus(&self.name)?;
            }
        }
    }

    /// Switches to a resolution requested by
    /// [`Camera::set_resolution`](super::Camera::set_resolution), if any.
    fn apply_pending_resolution(&mut self) -> Result<()> {
        let Some((width, height)) = self.shared.resolution.lock().take() else {
            return Ok(());
        };
        if self.lag > 0 {
            // Pictures of the previous fragment may still wait for their overlay text.
            warn!(
                camera = self.name.as_str(),
                "resolution changes are not supported with B-frames: ignored"
            );
            return Ok(());
        }
        if (width, height) == (self.renderer.info.width(), self.renderer.info.height()) {
            return Ok(());
        }
        let layout = Layout::new(width, height, self.label_chars);
        let renderer = Renderer::new(width, height, self.timing.rate, layout)?;
        let caps = renderer.caps()?;
        info!(
            camera = self.name.as_str(),
            "resolution {}x{} -> {width}x{height} at fragment {}",
            self.renderer.info.width(),
            self.renderer.info.height(),
            self.next_index
        );
        // The previous frame has been encoded already (outputs are pulled synchronously), so the
        // overlay is idle and the new caps travel in order with the next buffer.
        self.pipe.apply_layout(&layout);
        self.pipe.appsrc.set_caps(Some(&caps));
        self.renderer = renderer;
        Ok(())
    }

    /// Renders frame `n` and pushes it.
    fn push_frame(&mut self, n: u64) -> Result<()> {
        let mut buffer = self.renderer.render(n)?;
        {
            let buffer = buffer
                .get_mut()
                .ok_or_else(|| pipeline_error("camera: new buffer is not writable"))?;
            let pts = self.timing.pts(n);
            buffer.set_pts(pts);
            buffer.set_duration(self.timing.pts(n + 1).saturating_sub(pts));
            buffer.set_offset(n);
        }
        if let Err(flow) = self.pipe.appsrc.push_buffer(buffer) {
            self.pipe.check_bus(&self.name)?;
            return Err(pipeline_error(format!(
                "camera {}: pushing frame {n} failed: {flow:?}",
                self.name
            )));
        }
        Ok(())
    }

    /// Waits for the next encoded access unit; `None` if a stop was requested meanwhile.
    fn pull_output(&mut self) -> Result<Option<gst::Sample>> {
        let deadline = Instant::now() + OUTPUT_TIMEOUT;
        loop {
            if let Some(sample) = self
                .pipe
                .appsink
                .try_pull_sample(gst::ClockTime::from_mseconds(PULL_SLICE_MS))
            {
                return Ok(Some(sample));
            }
            self.pipe.check_bus(&self.name)?;
            if self.shared.stopping() {
                return Ok(None);
            }
            if self.pipe.appsink.is_eos() {
                return Err(pipeline_error(format!(
                    "camera {}: the encoder branch ended unexpectedly",
                    self.name
                )));
            }
            if Instant::now() > deadline {
                return Err(pipeline_error(format!(
                    "camera {}: no encoded output within {OUTPUT_TIMEOUT:?}",
                    self.name
                )));
            }
        }
    }

    /// The track described by `caps`, reusing the current `Arc` when nothing changed.
    fn track_for(&mut self, caps: Option<&gst::CapsRef>) -> Result<Arc<VideoTrack>> {
        if let (Some(track), Some(caps), Some(last)) = (&self.track, caps, &self.last_caps)
            && caps == last.as_ref()
        {
            return Ok(track.clone());
        }
        let caps = caps
            .ok_or_else(|| pipeline_error(format!("camera {}: sample without caps", self.name)))?;
        let s = caps
            .structure(0)
            .ok_or_else(|| pipeline_error(format!("camera {}: empty caps", self.name)))?;
        let dimension = |field: &str| {
            s.get::<i32>(field)
                .ok()
                .and_then(|v| u32::try_from(v).ok())
                .ok_or_else(|| {
                    pipeline_error(format!(
                        "camera {}: caps without {field}: {caps}",
                        self.name
                    ))
                })
        };
        let codec_data = s.get::<gst::Buffer>("codec_data").map_err(|_| {
            pipeline_error(format!(
                "camera {}: caps without codec_data: {caps}",
                self.name
            ))
        })?;
        let config = codec_data
            .map_readable()
            .map_err(|_| pipeline_error("camera: cannot map codec_data"))?
            .to_vec();
        let codec = if s.name() == "video/x-h265" {
            crate::VideoCodec::H265
        } else {
            crate::VideoCodec::H264
        };
        let track = VideoTrack {
            codec,
            width: dimension("width")?,
            height: dimension("height")?,
            timescale: self.timing.timescale,
            config,
        };
        self.last_caps = Some(caps.to_owned());
        match &self.track {
            Some(current) if **current == track => Ok(current.clone()),
            _ => {
                info!(
                    camera = self.name.as_str(),
                    "new track {}x{}, {} bytes of codec data",
                    track.width,
                    track.height,
                    track.config.len()
                );
                let track = Arc::new(track);
                self.track = Some(track.clone());
                Ok(track)
            }
        }
    }

    /// Adds an encoded access unit to the fragment of its picture, and delivers the fragments
    /// that are complete.
    fn take_sample(&mut self, sample: &gst::Sample) -> Result<()> {
        let track = self.track_for(sample.caps())?;
        let buffer = sample.buffer_owned().ok_or_else(|| {
            pipeline_error(format!("camera {}: sample without buffer", self.name))
        })?;
        let is_sync = !buffer.flags().contains(gst::BufferFlags::DELTA_UNIT);
        // Encoders may shift timestamps (x264enc adds 1000 h so that DTS never goes negative)
        // and say so in the segment: compare in running time.
        let pts = buffer.pts().map(|pts| {
            sample
                .segment()
                .and_then(|segment| segment.downcast_ref::<gst::format::Time>())
                .and_then(|segment| segment.to_running_time(pts))
                .unwrap_or(pts)
        });
        let fpf = self.frames_per_fragment;
        let n = match pts.map(|pts| self.timing.frame_of_pts(pts)) {
            Some(n) => n,
            None => {
                warn!(camera = self.name.as_str(), "encoded frame without PTS");
                self.open.front().map_or(0, |f| f.first_frame)
            }
        };
        // PTS − DTS from the buffer's own (shifted alike) timestamps.
        let composition_offset = match (buffer.pts(), buffer.dts()) {
            (Some(pts), Some(dts)) => {
                let ns = i128::from(pts.nseconds()) - i128::from(dts.nseconds());
                i32::try_from(self.timing.ns_to_ticks(ns)).unwrap_or(0)
            }
            _ => 0,
        };
        let data = match buffer.into_mapped_buffer_readable() {
            Ok(mapped) => bytes::Bytes::from_owner(mapped),
            Err(_) => {
                return Err(pipeline_error(format!(
                    "camera {}: cannot map encoded frame {n}",
                    self.name
                )));
            }
        };
        let Some(fragment) = self
            .open
            .iter_mut()
            .find(|f| (f.first_frame..f.first_frame + fpf).contains(&n))
        else {
            return Err(pipeline_error(format!(
                "camera {}: encoded frame {n} belongs to no open fragment",
                self.name
            )));
        };
        match &fragment.track {
            None => {
                if !is_sync {
                    warn!(
                        camera = self.name.as_str(),
                        "fragment {} starts with a non-sync sample (frame {n})", fragment.index
                    );
                }
                fragment.track = Some(track.clone());
            }
            Some(first) if !Arc::ptr_eq(first, &track) => {
                warn!(
                    camera = self.name.as_str(),
                    "codec data changed inside fragment {} (frame {n})", fragment.index
                );
            }
            Some(_) => {}
        }
        let sample = Sample {
            data,
            duration: self.timing.ticks_per_frame,
            composition_offset,
            is_sync,
        };
        let live = LiveSample {
            fragment: fragment.index,
            fragment_start: self.timing.producer_time(fragment.first_frame),
            producer_time: self.timing.producer_time(n),
            track: fragment.track.clone().unwrap_or(track),
            sample: sample.clone(),
        };
        fragment.samples.push(sample);
        (self.on_event)(CameraEvent::Sample(live));
        while self
            .open
            .front()
            .is_some_and(|f| f.samples.len() as u64 >= fpf)
        {
            self.deliver();
        }
        Ok(())
    }

    /// Hands the finished fragment to the callback.
    fn deliver(&mut self) {
        let Some(mut fragment) = self.open.pop_front() else {
            return;
        };
        if self.offsets == crate::CompositionOffsets::Negative
            && let Some(first) = fragment.samples.first().map(|s| s.composition_offset)
        {
            for s in &mut fragment.samples {
                s.composition_offset = s.composition_offset.saturating_sub(first);
            }
        }
        let Some(track) = fragment.track else {
            return;
        };
        let frames = fragment.samples.len() as u64;
        let encoded = EncodedFragment {
            index: fragment.index,
            first_frame: fragment.first_frame,
            producer_start: self.timing.producer_time(fragment.first_frame),
            duration: self.timing.span(frames),
            decode_time: self.timing.decode_time(fragment.first_frame),
            track,
            samples: fragment.samples,
        };
        debug!(
            camera = self.name.as_str(),
            index = encoded.index,
            first_frame = encoded.first_frame,
            "fragment ready"
        );
        (self.on_event)(CameraEvent::Fragment(encoded));
    }
}
