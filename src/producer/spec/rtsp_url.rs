//! The camera URL ([`RtspUrl`]): redacted wherever it is shown, its secrets, its validation.

use std::fmt;

use crate::error::{Error, Result};
use crate::producer::secrets::{Secrets, is_secret_name};

/// An RTSP URL, which usually carries the camera's password.
///
/// `Display` and `Debug` show it redacted (`rtsp://admin:***@10.0.0.5/live`); only
/// [`expose`](RtspUrl::expose) gives the original, to build the producer's command line.
#[derive(Clone, PartialEq, Eq)]
pub struct RtspUrl(String);

impl RtspUrl {
    /// Wraps `url` (validated when the producer starts).
    #[must_use]
    pub fn new(url: impl Into<String>) -> Self {
        RtspUrl(url.into())
    }

    /// The URL with its password, for the child's command line. Never log it.
    #[must_use]
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with its password replaced by `***` and secret query parameters
    /// (`password=`, `token=`, …) by `<redacted>`; a string that is not a URL with a host
    /// (where the redaction rules cannot locate a password) is hidden entirely.
    #[must_use]
    pub fn redacted(&self) -> String {
        match url::Url::parse(&self.0) {
            Ok(u) if u.host_str().is_some_and(|h| !h.is_empty()) => {
                self.secrets().redact(&self.0).into_owned()
            }
            _ => "<not a URL: hidden>".to_owned(),
        }
    }

    /// The password of the URL (as written and percent-decoded) and its secret query values.
    pub(super) fn secret_values(&self) -> Vec<String> {
        let Ok(u) = url::Url::parse(&self.0) else {
            return Vec::new();
        };
        let mut out = Vec::new();
        if let Some(pw) = u.password() {
            out.push(pw.to_owned());
            if let Ok(decoded) = percent_decode(pw) {
                out.push(decoded);
            }
        }
        for (k, v) in u.query_pairs() {
            if is_secret_name(&k) {
                out.push(v.into_owned());
            }
        }
        out
    }

    fn secrets(&self) -> Secrets {
        Secrets::new(self.secret_values())
    }

    /// Checks that the URL parses and, when `rtsp_only`, that its scheme is `rtsp`, `rtsps`,
    /// `rtspt` or `rtspu`. The error shows the URL redacted, or not at all when it does not
    /// parse (a malformed URL may hide its password from the redaction rules).
    pub(crate) fn validate(&self, rtsp_only: bool) -> Result<()> {
        let parsed = url::Url::parse(&self.0).map_err(|e| {
            Error::invalid_config("rtsp_url", self.redacted(), &format!("not a URL: {e}"))
        })?;
        // Without an authority (`admin:pw@cam/x` parses with scheme `admin`), the redaction
        // rules cannot find the password: hide the value.
        let has_host = parsed.host_str().is_some_and(|h| !h.is_empty());
        let shown = self.redacted();
        if !has_host {
            return Err(Error::invalid_config(
                "rtsp_url",
                shown,
                "the URL has no host (expected rtsp://[user:password@]host[:port]/path)",
            ));
        }
        if rtsp_only && !matches!(parsed.scheme(), "rtsp" | "rtsps" | "rtspt" | "rtspu") {
            return Err(Error::invalid_config(
                "rtsp_url",
                shown,
                "the scheme must be rtsp, rtsps, rtspt or rtspu",
            ));
        }
        Ok(())
    }
}

impl fmt::Display for RtspUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl fmt::Debug for RtspUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "RtspUrl({:?})", self.redacted())
    }
}

/// `%XX` sequences decoded (for the URL password in its decoded form).
fn percent_decode(text: &str) -> std::result::Result<String, ()> {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3).ok_or(())?;
            let hex = std::str::from_utf8(hex).map_err(|_| ())?;
            out.push(u8::from_str_radix(hex, 16).map_err(|_| ())?);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ())
}
