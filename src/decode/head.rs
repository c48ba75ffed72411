//! The part both heads share before the tail: `parsebin` (type finding, demuxer, depayloader,
//! parser) and the video decoder this module plugs after it, in one bin whose src pads carry
//! decoded video.
//!
//! `decodebin` would do the same, but it puts a `multiqueue` after every demuxer, and the
//! decoder then runs in the multiqueue's thread: each frame crosses one more thread (a futex
//! wake and a context switch on both sides: twice the context switches per frame, 1–2 % of the
//! CPU per frame of a file, see docs/architecture.md). Here the decoder runs in the demuxer's
//! streaming thread (`appsrc`'s for KVS, `filesrc`/`qtdemux`'s or `rtspsrc`'s for URIs).
//! Streams other than video (audio, metadata) are not decoded at all: their buffers are dropped
//! at parsebin's pad.

use super::*;

/// A bin `parsebin → decoder` with a ghost `sink` pad: its src pads (added as streams appear)
/// carry decoded video.
pub(crate) fn parse_decode_bin(name: &str) -> Result<gst::Bin> {
    let bin = gst::Bin::with_name(name);
    let parsebin = element("parsebin")?;
    bin.add(&parsebin).map_err(Error::from)?;
    let sink = parsebin
        .static_pad("sink")
        .ok_or_else(|| Error::new(ErrorKind::Pipeline, "parsebin has no sink pad"))?;
    let ghost = gst::GhostPad::builder_with_target(&sink)
        .map_err(Error::from)?
        .name("sink")
        .build();
    bin.add_pad(&ghost).map_err(Error::from)?;
    plug_decoders(&bin, &parsebin);
    Ok(bin)
}

/// For every stream `parsebin` (inside `bin`) exposes: raw video is ghosted out of `bin` as is;
/// encoded video gets the highest-ranked decoder that takes it, whose src pad is ghosted out;
/// other streams are dropped at the pad. Video without a decoder is an error on the bus
/// (`StreamError::CodecNotFound`, as `decodebin` reports it). A stream that ends with its
/// group (a new init segment with another codec) takes its decoder and ghost pad with it.
fn plug_decoders(bin: &gst::Bin, parsebin: &gst::Element) {
    let streams: Streams = Arc::default();
    let weak = bin.downgrade();
    let added = Arc::clone(&streams);
    parsebin.connect_pad_added(move |parsebin, pad| {
        let Some(bin) = weak.upgrade() else {
            return;
        };
        match expose(&bin, pad) {
            Ok(stream) => added.lock().push(stream),
            Err(why) => gst::element_error!(
                parsebin,
                gst::StreamError::CodecNotFound,
                ("{}", why),
                ["in {}", bin.name()]
            ),
        }
    });
    retire_when_removed(bin, parsebin, streams);
}

/// What `bin` added for the pads of one element (parsebin, urisourcebin).
type Streams = Arc<Mutex<Vec<Stream>>>;

/// When a pad of `element` goes away, what `bin` added for it (in `streams`) goes too.
fn retire_when_removed(bin: &gst::Bin, element: &gst::Element, streams: Streams) {
    let weak = bin.downgrade();
    element.connect_pad_removed(move |_, pad| {
        let gone = {
            let mut streams = streams.lock();
            let i = streams.iter().position(|s| &s.pad == pad);
            i.map(|i| streams.remove(i))
        };
        if let (Some(bin), Some(stream)) = (weak.upgrade(), gone) {
            retire(&bin, stream);
        }
    });
}

/// What the bin added for one pad of parsebin (or of urisourcebin: its parsebin).
struct Stream {
    /// The pad of parsebin (urisourcebin).
    pad: gst::Pad,
    /// The decoder (parsebin) fed by `pad`; none for raw video and dropped streams.
    element: Option<gst::Element>,
    /// The bin's src pad (none for dropped streams).
    ghost: Option<gst::GhostPad>,
}

/// Links `pad` (of parsebin) to what its stream needs; `Err` names video no decoder takes.
fn expose(bin: &gst::Bin, pad: &gst::Pad) -> std::result::Result<Stream, String> {
    let possible = pad.query_caps(None);
    let media = pad
        .current_caps()
        .as_deref()
        .unwrap_or(&possible)
        .structure(0)
        .map(|s| s.name().to_string())
        .unwrap_or_default();
    let (element, out) = if media == "video/x-raw" {
        (None, pad.clone())
    } else {
        match decoder_for(&possible) {
            Some(decoder) => {
                link_into(bin, &decoder, pad)?;
                let src = decoder
                    .static_pad("src")
                    .ok_or_else(|| format!("{} has no src pad", decoder.name()))?;
                (Some(decoder), src)
            }
            None if media.starts_with("video/") || media.starts_with("image/") => {
                return Err(format!("no decoder installed for {media}"));
            }
            None => {
                // Audio, subtitles, metadata: not decoded, and dropped at the pad. Not a
                // fakesink: with no queue between the demuxer and its sinks, a sink that
                // received the first buffer would block the demuxer's only thread in preroll
                // before the video sink ever prerolled.
                pad.add_probe(
                    gst::PadProbeType::BUFFER | gst::PadProbeType::BUFFER_LIST,
                    |_, info| discard(info),
                );
                return Ok(Stream {
                    pad: pad.clone(),
                    element: None,
                    ghost: None,
                });
            }
        }
    };
    let ghost = gst::GhostPad::builder_with_target(&out)
        .map_err(|e| e.to_string())?
        .build();
    ghost.set_active(true).map_err(|e| e.to_string())?;
    bin.add_pad(&ghost).map_err(|e| e.to_string())?;
    Ok(Stream {
        pad: pad.clone(),
        element,
        ghost: Some(ghost),
    })
}

/// Adds `element` to `bin`, starts it and links `pad` to its sink pad.
fn link_into(
    bin: &gst::Bin,
    element: &gst::Element,
    pad: &gst::Pad,
) -> std::result::Result<(), String> {
    bin.add(element).map_err(|e| e.to_string())?;
    element
        .sync_state_with_parent()
        .map_err(|e| e.to_string())?;
    let sink = element
        .static_pad("sink")
        .ok_or_else(|| format!("{} has no sink pad", element.name()))?;
    pad.link(&sink)
        .map(|_| ())
        .map_err(|e| format!("cannot link to {}: {e:?}", element.name()))
}

/// The decoder `decodebin` would pick for `caps`: the highest-ranked decoder (rank marginal or
/// above) whose sink accepts them and that outputs raw video; ties by name.
fn decoder_for(caps: &gst::CapsRef) -> Option<gst::Element> {
    let raw = gst::Caps::new_empty_simple("video/x-raw");
    let mut factories: Vec<gst::ElementFactory> = gst::ElementFactory::factories_with_type(
        gst::ElementFactoryType::DECODER,
        gst::Rank::MARGINAL,
    )
    .into_iter()
    .filter(|f| {
        f.can_sink_any_caps(caps)
            && f.static_pad_templates()
                .iter()
                .any(|t| t.direction() == gst::PadDirection::Src && t.caps().can_intersect(&raw))
    })
    .collect();
    factories.sort_by(|a, b| {
        b.rank()
            .cmp(&a.rank())
            .then_with(|| a.name().cmp(&b.name()))
    });
    factories.iter().find_map(|f| f.create().build().ok())
}

/// A stream of parsebin ended (its group was replaced, or the pipeline stops): its ghost pad
/// leaves `bin`, and its decoder too (off the streaming thread).
fn retire(bin: &gst::Bin, stream: Stream) {
    if let Some(ghost) = stream.ghost {
        let _ = bin.remove_pad(&ghost);
    }
    if let Some(element) = stream.element {
        let bin = bin.downgrade();
        element.call_async(move |element| {
            let _ = element.set_state(gst::State::Null);
            if let Some(bin) = bin.upgrade() {
                let _ = bin.remove(element);
            }
        });
    }
}

/// A bin `urisourcebin → parsebin (one per source pad) → decoder` for `uri`, with the
/// `urisourcebin` (whose `source-setup` signal configures `rtspsrc`, `souphttpsrc`, …): what
/// `uridecodebin` does, without its `multiqueue` thread between demuxer and decoder.
pub(crate) fn uri_decode_bin(name: &str, uri: &str) -> Result<(gst::Bin, gst::Element)> {
    let bin = gst::Bin::with_name(name);
    let source = crate::elements::make_with("urisourcebin", |b| b.property("uri", uri))?;
    bin.add(&source).map_err(Error::from)?;
    let parsers: Streams = Arc::default();
    let weak = bin.downgrade();
    let added = Arc::clone(&parsers);
    source.connect_pad_added(move |source, pad| {
        let Some(bin) = weak.upgrade() else {
            return;
        };
        let parsebin = match element("parsebin") {
            Ok(parsebin) => parsebin,
            Err(e) => {
                gst::element_error!(source, gst::CoreError::MissingPlugin, ("{}", e));
                return;
            }
        };
        plug_decoders(&bin, &parsebin);
        if let Err(why) = link_into(&bin, &parsebin, pad) {
            gst::element_error!(source, gst::CoreError::Negotiation, ("{}", why));
            return;
        }
        added.lock().push(Stream {
            pad: pad.clone(),
            element: Some(parsebin),
            ghost: None,
        });
    });
    retire_when_removed(&bin, &source, parsers);
    Ok((bin, source))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread::ThreadId;

    /// Plays `pipeline` and waits (20 s at most: a deadlock fails here) for its end of stream.
    fn play_to_eos(pipeline: &gst::Element) {
        pipeline.set_state(gst::State::Playing).unwrap();
        let msg = pipeline
            .bus()
            .unwrap()
            .timed_pop_filtered(
                gst::ClockTime::from_seconds(20),
                &[gst::MessageType::Eos, gst::MessageType::Error],
            )
            .expect("no end of stream within 20 s");
        assert!(matches!(msg.view(), gst::MessageView::Eos(_)), "{msg:?}");
    }

    /// A Matroska file of `frames` 160x120 H.264 frames and raw audio, made by GStreamer.
    fn mkv_with_audio(frames: u32) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("kvs-frames-head-{}.mkv", std::process::id()));
        let description = format!(
            "videotestsrc num-buffers={frames} ! video/x-raw,format=I420,width=160,height=120,framerate=25/1 \
             ! x264enc bframes=0 ! h264parse ! queue ! matroskamux name=mux ! filesink location={} \
             audiotestsrc num-buffers=10 samplesperbuffer=1764 ! audio/x-raw,format=S16LE,rate=44100,channels=1 \
             ! queue ! mux.",
            path.display()
        );
        let pipeline = gst::parse::launch(&description).unwrap();
        play_to_eos(&pipeline);
        pipeline.set_state(gst::State::Null).unwrap();
        path
    }

    /// The head decodes every frame of a file with a second (audio) stream, in the demuxer's
    /// thread: no queue or multiqueue inside, and the thread that leaves the demuxer is the one
    /// that leaves the decoder. (With `decodebin` the decoder ran in a multiqueue thread.)
    #[test]
    fn the_decoder_runs_in_the_demuxers_thread_and_every_frame_comes_out() {
        gst::init().unwrap();
        let path = mkv_with_audio(30);
        let pipeline = gst::Pipeline::new();
        let src = crate::elements::make_with("filesrc", |b| {
            b.property("location", path.to_str().unwrap())
        })
        .unwrap();
        let bin = parse_decode_bin("decode").unwrap();
        let sink = crate::elements::make_with("fakesink", |b| b.property("sync", false)).unwrap();
        pipeline.add_many([&src, bin.upcast_ref(), &sink]).unwrap();
        src.link(&bin).unwrap();
        // Threads seen leaving the demuxer's video pad and the decoder.
        let demuxed: Arc<Mutex<Vec<ThreadId>>> = Arc::default();
        let decoded: Arc<Mutex<Vec<(ThreadId, String)>>> = Arc::default();
        {
            let demuxed = Arc::clone(&demuxed);
            bin.connect("deep-element-added", false, move |values| {
                let element = values.get(2)?.get::<gst::Element>().ok()?;
                if element
                    .factory()
                    .is_some_and(|f| f.klass().contains("Demuxer"))
                {
                    let demuxed = Arc::clone(&demuxed);
                    element.connect_pad_added(move |_, pad| {
                        if pad.name().starts_with("video") {
                            let demuxed = Arc::clone(&demuxed);
                            pad.add_probe(gst::PadProbeType::BUFFER, move |_, _| {
                                demuxed.lock().push(std::thread::current().id());
                                gst::PadProbeReturn::Ok
                            });
                        }
                    });
                }
                None
            });
        }
        let sink_pad = sink.static_pad("sink").unwrap();
        bin.connect_pad_added(move |_, pad| {
            pad.link(&sink_pad).unwrap();
        });
        let probe_decoded = Arc::clone(&decoded);
        sink.static_pad("sink")
            .unwrap()
            .add_probe(gst::PadProbeType::BUFFER, move |pad, _| {
                let caps = pad
                    .current_caps()
                    .map(|c| c.to_string())
                    .unwrap_or_default();
                probe_decoded
                    .lock()
                    .push((std::thread::current().id(), caps));
                gst::PadProbeReturn::Ok
            });
        play_to_eos(pipeline.upcast_ref());
        let _ = std::fs::remove_file(&path);
        let factories: Vec<String> = bin
            .iterate_recurse()
            .into_iter()
            .filter_map(|e| e.ok()?.factory().map(|f| f.name().to_string()))
            .collect();
        pipeline.set_state(gst::State::Null).unwrap();
        assert!(factories.iter().any(|f| f == "avdec_h264"), "{factories:?}");
        assert!(
            !factories.iter().any(|f| f == "multiqueue" || f == "queue"),
            "{factories:?}"
        );
        // The audio stream was not decoded, nor given a sink that could block the demuxer.
        assert!(!factories.iter().any(|f| f == "fakesink"), "{factories:?}");
        let decoded = decoded.lock();
        assert_eq!(decoded.len(), 30, "every frame decoded");
        assert!(
            decoded
                .iter()
                .all(|(_, caps)| caps.starts_with("video/x-raw"))
        );
        let demuxed = demuxed.lock();
        assert_eq!(demuxed.len(), 30);
        assert!(
            decoded.iter().all(|(t, _)| *t == demuxed[0]),
            "one streaming thread from demuxer to decoder output"
        );
    }

    /// The decoder chosen for parsed caps is the one decodebin picks (avdec_* here); caps no
    /// decoder takes, and streams that decode to something other than video, get none.
    #[test]
    fn decoders_are_chosen_by_caps_and_rank() {
        gst::init().unwrap();
        let pick = |caps: &str| {
            decoder_for(&caps.parse::<gst::Caps>().unwrap())
                .and_then(|d| d.factory())
                .map(|f| f.name().to_string())
        };
        assert_eq!(
            pick("video/x-h264,stream-format=avc,alignment=au").as_deref(),
            Some("avdec_h264")
        );
        assert_eq!(
            pick("video/x-h265,stream-format=hvc1,alignment=au").as_deref(),
            Some("avdec_h265")
        );
        assert_eq!(pick("video/x-no-such-codec"), None);
        assert_eq!(pick("audio/mpeg,mpegversion=4"), None);
    }
}
