//! The GStreamer elements the emulator creates, and the Debian package that provides each, so
//! that a missing plugin fails at start with
//!
//! ```text
//! camera: GStreamer element 'textoverlay' is missing: install gstreamer1.0-x
//! ```
//!
//! [`ELEMENTS`] lists every element that the emulator, its binary and its tests create (the
//! workspace's `tests/fresh_machine.rs` scans the sources to keep it complete and checks each
//! package against the plugin file and against `make deps`).

use gstreamer as gst;

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

/// Every GStreamer element created by the emulator and its tests, with its Debian 12 package.
pub const ELEMENTS: &[ElementPackage] = &[
    e("appsink", "gstreamer1.0-plugins-base"),
    e("appsrc", "gstreamer1.0-plugins-base"),
    e("videoconvert", "gstreamer1.0-plugins-base"),
    e("videotestsrc", "gstreamer1.0-plugins-base"),
    e("audiotestsrc", "gstreamer1.0-plugins-base"),
    e("audioconvert", "gstreamer1.0-plugins-base"),
    e("capsfilter", "libgstreamer1.0-0"),
    e("aacparse", "gstreamer1.0-plugins-good"),
    e("avenc_aac", "gstreamer1.0-libav"),
    e("qtdemux", "gstreamer1.0-plugins-good"),
    e("h264parse", "gstreamer1.0-plugins-bad"),
    e("x264enc", "gstreamer1.0-plugins-ugly"),
    e("x265enc", "gstreamer1.0-plugins-bad"),
    e("h265parse", "gstreamer1.0-plugins-bad"),
    e("avdec_h264", "gstreamer1.0-libav"),
    e("textoverlay", "gstreamer1.0-x"),
];

/// The Debian package that provides `element`, if the emulator knows it.
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

/// Creates element `factory` (a missing one fails with [`missing`]).
pub fn make(factory: &str) -> Result<gst::Element> {
    if gst::ElementFactory::find(factory).is_none() {
        return Err(missing(factory));
    }
    gst::ElementFactory::make(factory).build().map_err(|e| {
        Error::new(
            ErrorKind::Pipeline,
            format!("GStreamer element '{factory}' cannot be created: {e}"),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_element_and_package() {
        assert_eq!(
            missing("textoverlay").to_string(),
            "GStreamer element 'textoverlay' is missing: install gstreamer1.0-x"
        );
        let _ = gst::init();
        assert!(make("no-such-element-here").is_err());
        assert!(make("appsrc").is_ok());
    }
}
