//! The GStreamer elements this crate creates, and the Debian package that provides each.
//!
//! GStreamer finds its elements at run time, in plugins that Linux distributions ship in
//! separate packages; a missing one is otherwise only noticed when a pipeline fails, with a
//! message that names neither the element nor where to get it. Everything here that builds a
//! pipeline first asks this table, so a missing plugin fails at `build()` (or at start) with
//!
//! ```text
//! GStreamer element 'avdec_h264' is missing: install gstreamer1.0-libav
//! ```
//!
//! [`ELEMENTS`] lists every element that the library, its examples, tests and benches create
//! (a test scans the sources to keep it complete, and checks each package against the plugin
//! file that provides the element and against `make deps`). The emulator's camera elements are
//! in the `kvs-emulator` crate's own table.

use gstreamer as gst;
use gstreamer::prelude::*;

use crate::error::{Error, ErrorKind, Result};

/// An element and the Debian (and Ubuntu) package whose plugin provides it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ElementPackage {
    /// The element's factory name, as in `gst-inspect-1.0 NAME`.
    pub element: &'static str,
    /// The Debian package to install when it is missing.
    pub package: &'static str,
}

const fn e(element: &'static str, package: &'static str) -> ElementPackage {
    ElementPackage { element, package }
}

const CORE: &str = "libgstreamer1.0-0";
const BASE: &str = "gstreamer1.0-plugins-base";
const GOOD: &str = "gstreamer1.0-plugins-good";
const BAD: &str = "gstreamer1.0-plugins-bad";
const UGLY: &str = "gstreamer1.0-plugins-ugly";
const LIBAV: &str = "gstreamer1.0-libav";

/// Every GStreamer element created by this crate, its examples, tests and benches, with the
/// package that provides it on Debian 12 (and Ubuntu). Elements that `parsebin`,
/// `urisourcebin` and `decodebin` plug by themselves for the media this crate reads are listed too.
pub const ELEMENTS: &[ElementPackage] = &[
    // core elements (libgstcoreelements)
    e("capsfilter", CORE),
    e("fakesink", CORE),
    e("filesink", CORE),
    e("filesrc", CORE),
    e("identity", CORE),
    e("multiqueue", CORE),
    e("queue", CORE),
    e("tee", CORE),
    e("typefind", CORE),
    // plugins-base
    e("appsink", BASE),
    e("appsrc", BASE),
    e("audiotestsrc", BASE),
    e("decodebin", BASE),
    e("parsebin", BASE),
    e("urisourcebin", BASE),
    e("videoconvert", BASE),
    e("videorate", BASE),
    e("videoscale", BASE),
    e("videotestsrc", BASE),
    // plugins-good
    e("aacparse", GOOD),
    e("alawenc", GOOD),
    e("autovideosink", GOOD),
    e("jpegdec", GOOD),
    e("jpegenc", GOOD),
    e("matroskademux", GOOD),
    e("matroskamux", GOOD),
    e("mp4mux", GOOD),
    e("pngenc", GOOD),
    e("qtdemux", GOOD),
    e("rtph264depay", GOOD),
    e("rtph264pay", GOOD),
    e("rtph265depay", GOOD),
    e("rtph265pay", GOOD),
    e("rtppcmadepay", GOOD),
    e("rtppcmapay", GOOD),
    e("rtpjitterbuffer", GOOD),
    e("rtspsrc", GOOD),
    e("souphttpsrc", GOOD),
    // plugins-bad
    e("h264parse", BAD),
    e("h265parse", BAD),
    e("hlsdemux", BAD),
    e("hlssink2", BAD),
    e("tsdemux", BAD),
    e("x265enc", BAD),
    // plugins-ugly
    e("x264enc", UGLY),
    // libav
    e("avdec_h264", LIBAV),
    e("avdec_h265", LIBAV),
    e("avenc_aac", LIBAV),
];

/// Elements that run only in other programs this crate starts (producer pipelines under
/// `gst-launch-1.0`), which no Debian package provides: they come with the producer's own
/// installation.
pub const EXTERNAL_ELEMENTS: &[&str] = &["kvssink"];

/// The Debian package that provides `element`, if this crate knows it.
pub fn package_of(element: &str) -> Option<&'static str> {
    ELEMENTS
        .iter()
        .find(|p| p.element == element)
        .map(|p| p.package)
}

/// The error for a missing element: it names the element and the package to install.
pub fn missing(element: &str) -> Error {
    let remedy = match package_of(element) {
        Some(package) => format!("install {package}"),
        None => "install the GStreamer plugin that provides it".to_string(),
    };
    Error::new(
        ErrorKind::Pipeline,
        format!("GStreamer element '{element}' is missing: {remedy}"),
    )
}

/// Initialises GStreamer (once per process) or says why it cannot be.
pub fn init() -> Result<()> {
    gst::init().map_err(|e| {
        Error::new(
            ErrorKind::Pipeline,
            format!("cannot initialise GStreamer: {e}"),
        )
    })
}

/// Checks that every element in `elements` can be created; the first missing one is the error
/// ([`missing`]). Initialises GStreamer.
pub fn require(elements: &[&str]) -> Result<()> {
    init()?;
    match elements
        .iter()
        .find(|name| gst::ElementFactory::find(name).is_none())
    {
        Some(name) => Err(missing(name)),
        None => Ok(()),
    }
}

/// Creates element `factory` (a missing one fails with [`missing`]).
pub fn make(factory: &str) -> Result<gst::Element> {
    make_with(factory, |builder| builder)
}

/// Creates element `factory` with the properties `set` gives its builder (a missing element
/// fails with [`missing`]):
///
/// ```no_run
/// let sink = kvs_frames::elements::make_with("filesink", |b| b.property("location", "out.mp4"))?;
/// # Ok::<(), kvs_frames::Error>(())
/// ```
pub fn make_with<'a>(
    factory: &'a str,
    set: impl FnOnce(
        gst::element_factory::ElementBuilder<'a>,
    ) -> gst::element_factory::ElementBuilder<'a>,
) -> Result<gst::Element> {
    let found = gst::ElementFactory::find(factory).ok_or_else(|| missing(factory))?;
    set(gst::ElementFactory::make(factory))
        .build()
        .map_err(|e| {
            let plugin = found
                .plugin()
                .map(|p| p.plugin_name().to_string())
                .unwrap_or_default();
            Error::new(
                ErrorKind::Pipeline,
                format!("GStreamer element '{factory}' (plugin {plugin:?}) cannot be created: {e}"),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_unique_and_sorted_within_packages() {
        let mut names: Vec<_> = ELEMENTS.iter().map(|p| p.element).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ELEMENTS.len(), "an element is listed twice");
    }

    #[test]
    fn the_error_names_element_and_package() {
        let err = missing("avdec_h264");
        assert_eq!(err.kind(), ErrorKind::Pipeline);
        assert_eq!(
            err.to_string(),
            "GStreamer element 'avdec_h264' is missing: install gstreamer1.0-libav"
        );
        assert!(
            missing("nosuchelement")
                .to_string()
                .contains("'nosuchelement'")
        );
    }

    #[test]
    fn require_finds_the_missing_one() {
        let err = require(&["appsrc", "no-such-element-here"]).unwrap_err();
        assert!(err.to_string().contains("'no-such-element-here'"), "{err}");
        require(&["appsrc", "appsink"]).unwrap();
    }
}
