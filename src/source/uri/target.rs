//! The URI a source reads: its kind, and its credentials kept apart from every text that
//! shows it.

use super::*;

/// A parsed, validated URI: what GStreamer gets, what logs show, and the credentials apart.
#[derive(Clone)]
pub(super) struct Target {
    pub(super) kind: UriKind,
    /// The URI given to `urisourcebin`, without credentials.
    pub(super) uri: String,
    /// The URI as the caller wrote it, credentials redacted: for logs, errors, Debug.
    pub(super) display: String,
    pub(super) user: Option<String>,
    pub(super) password: Option<String>,
}

impl std::fmt::Debug for Target {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Target")
            .field("kind", &self.kind)
            .field("uri", &self.display)
            .finish_non_exhaustive()
    }
}

pub(super) fn invalid_uri(display: &str, reason: &str) -> Error {
    Error::invalid_config("uri", format!("{display:?}"), reason)
}

/// Percent-decoding of URL user-info (`%40` → `@`); invalid escapes are kept as they are.
pub(super) fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%'
            && let Some(hex) = s.get(i + 1..i + 3)
            && let Ok(b) = u8::from_str_radix(hex, 16)
        {
            out.push(b);
            i += 3;
            continue;
        }
        out.push(bytes[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

impl Target {
    pub(super) fn parse(raw: &str) -> Result<Target> {
        let display = redact_url(raw.trim());
        let text = raw.trim();
        if text.is_empty() {
            return Err(invalid_uri(&display, "must not be empty"));
        }
        let scheme = text
            .split_once("://")
            .map(|(s, _)| s.to_ascii_lowercase())
            .filter(|s| {
                !s.is_empty()
                    && s.chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '+' | '-' | '.'))
            });
        let Some(scheme) = scheme else {
            return Self::file(std::path::Path::new(text), display);
        };
        let kind = match scheme.as_str() {
            "rtsp" | "rtsps" => UriKind::Rtsp,
            "http" | "https" => UriKind::Http,
            "file" => UriKind::File,
            _ => {
                return Err(invalid_uri(
                    &display,
                    "unsupported scheme: use rtsp://, rtsps://, http://, https://, file:// or a file path",
                ));
            }
        };
        let mut url = url::Url::parse(text)
            .map_err(|e| invalid_uri(&display, &format!("not a valid URL: {e}")))?;
        if kind == UriKind::File {
            let path = url
                .to_file_path()
                .map_err(|()| invalid_uri(&display, "not a local file URL"))?;
            return Self::file(&path, display);
        }
        if url.host_str().is_none_or(str::is_empty) {
            return Err(invalid_uri(&display, "has no host"));
        }
        let user = (!url.username().is_empty()).then(|| percent_decode(url.username()));
        let password = url.password().map(percent_decode);
        // Credentials go to the source element as properties, never in its location, so
        // GStreamer's own logs and messages do not carry them.
        let _ = url.set_username("");
        let _ = url.set_password(None);
        Ok(Target {
            kind,
            uri: url.to_string(),
            display,
            user,
            password,
        })
    }

    pub(super) fn file(path: &std::path::Path, display: String) -> Result<Target> {
        let meta = std::fs::metadata(path)
            .map_err(|e| invalid_uri(&display, &format!("cannot read the file: {e}")))?;
        if !meta.is_file() {
            return Err(invalid_uri(&display, "is not a regular file"));
        }
        let absolute = std::fs::canonicalize(path)
            .map_err(|e| invalid_uri(&display, &format!("cannot resolve the path: {e}")))?;
        let uri = url::Url::from_file_path(&absolute)
            .map_err(|()| invalid_uri(&display, "cannot be turned into a file URI"))?;
        Ok(Target {
            kind: UriKind::File,
            uri: uri.to_string(),
            display,
            user: None,
            password: None,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    pub(super) fn uris_are_classified_and_credentials_kept_apart() {
        let t = Target::parse("rtsp://admin:p%40ss@10.0.0.5:554/live?x=1").unwrap();
        assert_eq!(t.kind, UriKind::Rtsp);
        assert_eq!(t.uri, "rtsp://10.0.0.5:554/live?x=1");
        assert_eq!(t.user.as_deref(), Some("admin"));
        assert_eq!(t.password.as_deref(), Some("p@ss"));
        assert!(!t.display.contains("p%40ss"), "{}", t.display);
        let t = Target::parse("HTTPS://cdn.example.com/live/index.m3u8").unwrap();
        assert_eq!(t.kind, UriKind::Http);
        assert_eq!(t.user, None);
        for bad in [
            "",
            "  ",
            "ftp://host/x",
            "rtsp://",
            "http://:80/x.m3u8",
            "/no/such/file.mp4",
        ] {
            let err = Target::parse(bad).unwrap_err();
            assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{bad}: {err}");
            assert_eq!(err.invalid_option(), Some("uri"), "{bad}");
        }
        let err = Target::parse("ftp://user:hunter2@host/x").unwrap_err();
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    pub(super) fn percent_decoding_keeps_invalid_escapes() {
        assert_eq!(percent_decode("a%20b%2"), "a b%2");
        assert_eq!(percent_decode("%zz"), "%zz");
    }
}
