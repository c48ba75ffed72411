//! Removal of secrets from text before it is logged, stored in an error or shown to a user.
//!
//! A Kinesis Video Streams HLS session URL carries its credential in the query string
//! (`…/getHLSMasterPlaylist.m3u8?SessionToken=CiA…~`), presigned AWS URLs carry
//! `X-Amz-Signature`/`X-Amz-Credential`/`X-Amz-Security-Token`, RTSP camera URLs carry a
//! password (`rtsp://admin:secret@10.0.0.5/stream`) and producer command lines or environment
//! dumps carry `AWS_SECRET_ACCESS_KEY=…`/`AWS_SESSION_TOKEN=…`. Every [`Error`](crate::error::Error)
//! of this crate passes its message and context through [`redact_text`], and anything the crate
//! logs that may hold a URL goes through [`redact_url`] or [`redact_text`].
//!
//! # Rules
//!
//! 1. **Secret fields.** The value after one of these names (ASCII case-insensitive, `-` and `_`
//!    interchangeable, the name starting at a word boundary) followed by `=`, `:` or `%3D`
//!    becomes `<redacted>`:
//!    `SessionToken`, `session_token` (also `aws_session_token`, `--session-token`),
//!    `security_token` (also `X-Amz-Security-Token`, `aws_security_token`), `X-Amz-Signature`,
//!    `X-Amz-Credential`, `secret_access_key` (also `aws_secret_access_key`,
//!    `AWS_SECRET_ACCESS_KEY`), `SecretAccessKey`, `secret_key`/`secret-key` (kvssink) and
//!    `Authorization` (also `Proxy-Authorization`).
//!    This covers query parameters (`?SessionToken=…&`), JSON (`"SessionToken": "…"`, also with
//!    the quotes escaped as in `Debug` output), INI/environment lines
//!    (`aws_secret_access_key = …`) and headers (`Authorization: AWS4-HMAC-SHA256 …`).
//!    An unquoted value runs to `&`, whitespace, a quote, `<`, `>`, `\`, `,`, `;`, `)`, `]`,
//!    `}` or the end of the text; a quoted value runs to its closing quote; an unquoted
//!    `Authorization` value runs to the end of the line (header values contain spaces).
//! 2. **URL passwords.** `scheme://user:password@host` becomes `scheme://user:***@host` for any
//!    scheme (`rtsp`, `rtsps`, `http`, `https`, …). The password is everything between the first
//!    `:` and the last `@` of the authority (which ends at `/`, `?`, `#`, whitespace, `"`,
//!    `<`, `>` or `\`), so a password must be percent-encoded if it contains `/`, `?` or `#`,
//!    exactly as a URL parser requires.
//!
//! Redaction is idempotent: redacting already-redacted text changes nothing.
//!
//! # Example
//!
//! ```
//! use kvs_frames::redact::{redact_text, redact_url};
//!
//! let url = "https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/\
//!            getHLSMasterPlaylist.m3u8?SessionToken=CiAbC%2Bd~";
//! assert_eq!(
//!     redact_url(url),
//!     "https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/\
//!      getHLSMasterPlaylist.m3u8?SessionToken=<redacted>"
//! );
//! assert_eq!(
//!     redact_text("cannot open rtsp://admin:hunter2@10.0.0.5:554/live"),
//!     "cannot open rtsp://admin:***@10.0.0.5:554/live"
//! );
//! // Text without secrets is returned as is, without allocating.
//! assert!(matches!(redact_text("all good"), std::borrow::Cow::Borrowed(_)));
//! ```

use std::borrow::Cow;

/// What a secret value is replaced with.
pub const REDACTED: &str = "<redacted>";

/// What a URL password is replaced with.
pub const REDACTED_PASSWORD: &str = "***";

/// Names whose value is a secret, lower case, `_` standing for `-` or `_`.
const SECRET_KEYS: &[&str] = &[
    "sessiontoken",
    "session_token",
    "security_token",
    "x_amz_signature",
    "x_amz_credential",
    "secret_access_key",
    "secretaccesskey",
    "secret_key",
    "authorization",
];

/// Removes session tokens, signatures, credentials and URL passwords from `text`.
///
/// See the [module documentation](self) for the exact rules. Returns the input borrowed when
/// it contains nothing to redact.
#[must_use]
pub fn redact_text(text: &str) -> Cow<'_, str> {
    // Cheap pre-check: every rule needs one of these bytes.
    if !text.bytes().any(|b| matches!(b, b'=' | b':' | b'%')) {
        return Cow::Borrowed(text);
    }
    match redact_fields(text) {
        Some(fields) => match redact_passwords(&fields) {
            Some(both) => Cow::Owned(both),
            None => Cow::Owned(fields),
        },
        None => match redact_passwords(text) {
            Some(passwords) => Cow::Owned(passwords),
            None => Cow::Borrowed(text),
        },
    }
}

/// Removes session tokens, signatures, credentials and the password from a URL.
///
/// The same rules as [`redact_text`]; use it where a URL is logged or stored
/// (`tracing::debug!(url = %redact_url(&url))`).
#[must_use]
pub fn redact_url(url: &str) -> String {
    redact_text(url).into_owned()
}

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// Whether `i` starts a word: preceded by the start, a non-alphanumeric byte or a
/// percent-encoded byte (`…%3FSessionToken%3D…` in a URL nested inside another URL).
fn at_word_start(bytes: &[u8], i: usize) -> bool {
    i == 0
        || !is_word_byte(bytes[i - 1])
        || (i >= 3
            && bytes[i - 3] == b'%'
            && bytes[i - 2].is_ascii_hexdigit()
            && bytes[i - 1].is_ascii_hexdigit())
}

/// Matches `key` (lower case, `_` = `-` or `_`) at the start of `bytes`.
fn key_matches(bytes: &[u8], key: &str) -> bool {
    let key = key.as_bytes();
    bytes.len() >= key.len()
        && bytes.iter().zip(key).all(|(&b, &k)| {
            if k == b'_' {
                b == b'_' || b == b'-'
            } else {
                b.to_ascii_lowercase() == k
            }
        })
}

fn skip_blanks(bytes: &[u8], mut i: usize) -> usize {
    while i < bytes.len() && matches!(bytes[i], b' ' | b'\t') {
        i += 1;
    }
    i
}

/// After a key ending at `i`: an optional closing quote (maybe escaped), blanks, a separator
/// (`=`, `:`, `%3D`), blanks. Returns where the value starts.
fn separator_end(bytes: &[u8], mut i: usize) -> Option<usize> {
    if bytes.get(i) == Some(&b'\\') && matches!(bytes.get(i + 1), Some(b'"' | b'\'')) {
        i += 2;
    } else if matches!(bytes.get(i), Some(b'"' | b'\'')) {
        i += 1;
    }
    i = skip_blanks(bytes, i);
    match bytes.get(i) {
        Some(b'=' | b':') => i += 1,
        Some(b'%') if bytes.len() >= i + 3 && bytes[i + 1..i + 3].eq_ignore_ascii_case(b"3d") => {
            i += 3;
        }
        _ => return None,
    }
    Some(skip_blanks(bytes, i))
}

fn ends_unquoted_value(b: u8) -> bool {
    b.is_ascii_whitespace()
        || matches!(
            b,
            b'&' | b'"' | b'\'' | b'<' | b'>' | b'\\' | b',' | b';' | b')' | b']' | b'}'
        )
}

/// The end of the value starting at `start` (exclusive) and where copying resumes.
fn value_end(bytes: &[u8], start: usize, whole_line: bool) -> usize {
    // Quoted value: `"…"`, `'…'`, or `\"…\"` inside escaped (Debug) text.
    let (quote, escaped, content) = match (bytes.get(start), bytes.get(start + 1)) {
        (Some(b'\\'), Some(&q @ (b'"' | b'\''))) => (Some(q), true, start + 2),
        (Some(&q @ (b'"' | b'\'')), _) => (Some(q), false, start + 1),
        _ => (None, false, start),
    };
    let mut i = content;
    match quote {
        Some(q) if escaped => {
            while i < bytes.len() && !(bytes[i] == b'\\' && bytes.get(i + 1) == Some(&q)) {
                i += 1;
            }
        }
        Some(q) => {
            while i < bytes.len() && bytes[i] != q {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i = i.min(bytes.len());
        }
        None if whole_line => {
            while i < bytes.len() && !matches!(bytes[i], b'\r' | b'\n') {
                i += 1;
            }
        }
        None => {
            while i < bytes.len() && !ends_unquoted_value(bytes[i]) {
                i += 1;
            }
        }
    }
    i
}

/// Rule 1. Returns `None` when nothing changed.
fn redact_fields(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0; // bytes of `text` already handled
    let mut i = 0;
    while i < bytes.len() {
        if !is_word_byte(bytes[i]) || !at_word_start(bytes, i) {
            i += 1;
            continue;
        }
        let Some(key) = SECRET_KEYS
            .iter()
            .find(|k| key_matches(&bytes[i..], k))
            .filter(|k| !bytes.get(i + k.len()).is_some_and(|&b| is_word_byte(b)))
        else {
            i += 1;
            continue;
        };
        let key_end = i + key.len();
        let Some(value_start) = separator_end(bytes, key_end) else {
            i = key_end;
            continue;
        };
        let rest = &bytes[value_start..];
        let already = [
            REDACTED.as_bytes(),
            b"\"<redacted>",
            b"'<redacted>",
            b"\\\"<redacted>",
        ]
        .iter()
        .any(|r| rest.starts_with(r));
        // Where the secret begins: after an opening quote, if any.
        let secret_start = match rest {
            [b'\\', b'"' | b'\'', ..] => value_start + 2,
            [b'"' | b'\'', ..] => value_start + 1,
            _ => value_start,
        };
        let end = value_end(bytes, value_start, *key == "authorization");
        if already || end <= secret_start {
            i = end.max(key_end);
            continue;
        }
        let buf = out.get_or_insert_with(|| String::with_capacity(text.len()));
        buf.push_str(&text[copied..secret_start]);
        buf.push_str(REDACTED);
        copied = end;
        i = end;
    }
    out.map(|mut buf| {
        buf.push_str(&text[copied..]);
        buf
    })
}

fn ends_authority(b: u8) -> bool {
    // Not `'`: RFC 3986 allows it unencoded in a password (a sub-delim); a URL in single quotes
    // still redacts right, since the password ends at the last `@` of the authority.
    b.is_ascii_whitespace() || matches!(b, b'/' | b'?' | b'#' | b'"' | b'<' | b'>' | b'\\')
}

/// Rule 2. Returns `None` when nothing changed.
fn redact_passwords(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut search_from = 0;
    while let Some(pos) = text[search_from..].find("://") {
        let authority_start = search_from + pos + 3;
        let authority_end = bytes[authority_start..]
            .iter()
            .position(|&b| ends_authority(b))
            .map_or(bytes.len(), |n| authority_start + n);
        search_from = authority_end.max(authority_start);
        let authority = &text[authority_start..authority_end];
        let Some(at) = authority.rfind('@') else {
            continue;
        };
        let Some(colon) = authority[..at].find(':') else {
            continue;
        };
        let password = &authority[colon + 1..at];
        if password.is_empty() || password == REDACTED_PASSWORD {
            continue;
        }
        let buf = out.get_or_insert_with(|| String::with_capacity(text.len()));
        buf.push_str(&text[copied..authority_start + colon + 1]);
        buf.push_str(REDACTED_PASSWORD);
        copied = authority_start + at;
    }
    out.map(|mut buf| {
        buf.push_str(&text[copied..]);
        buf
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A realistic KVS token: base64-ish, URL-encoded `+`, `/`, `=`, ending with `~`.
    const TOKEN: &str = "CiAbC%2Bd%2Fef%3D%3Dgh+ij/kl=mn~";

    fn r(text: &str) -> String {
        redact_text(text).into_owned()
    }

    #[test]
    fn session_token_query_parameter() {
        let url = format!(
            "https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken={TOKEN}"
        );
        let out = r(&url);
        assert_eq!(
            out,
            "https://b-1234abcd.kinesisvideo.us-east-1.amazonaws.com/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=<redacted>"
        );
        assert_eq!(redact_url(&url), out);
    }

    #[test]
    fn token_in_middle_of_query_keeps_other_parameters() {
        let text =
            format!("getMP4MediaFragment.mp4?FragmentNumber=0&SessionToken={TOKEN}&TrackNumber=1");
        assert_eq!(
            r(&text),
            "getMP4MediaFragment.mp4?FragmentNumber=0&SessionToken=<redacted>&TrackNumber=1"
        );
    }

    #[test]
    fn parameter_names_are_case_insensitive() {
        assert_eq!(r("a?sessiontoken=abc~"), "a?sessiontoken=<redacted>");
        assert_eq!(r("a?SESSIONTOKEN=abc~"), "a?SESSIONTOKEN=<redacted>");
        assert_eq!(r("a?x-amz-signature=ff00"), "a?x-amz-signature=<redacted>");
    }

    #[test]
    fn presigned_url_parameters() {
        let url = "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256\
                   &X-Amz-Credential=AKIAEXAMPLE%2F20240101%2Fus-east-1%2Fs3%2Faws4_request\
                   &X-Amz-Date=20240101T000000Z&X-Amz-Expires=300\
                   &X-Amz-Security-Token=IQoJb3JpZ2luX2VjE%2B%2F%3D\
                   &X-Amz-SignedHeaders=host&X-Amz-Signature=0123456789abcdef";
        assert_eq!(
            redact_url(url),
            "https://bucket.s3.amazonaws.com/k?X-Amz-Algorithm=AWS4-HMAC-SHA256\
             &X-Amz-Credential=<redacted>&X-Amz-Date=20240101T000000Z&X-Amz-Expires=300\
             &X-Amz-Security-Token=<redacted>&X-Amz-SignedHeaders=host&X-Amz-Signature=<redacted>"
        );
    }

    #[test]
    fn value_terminators() {
        assert_eq!(r("SessionToken=a~ next"), "SessionToken=<redacted> next");
        assert_eq!(r("SessionToken=a~\tnext"), "SessionToken=<redacted>\tnext");
        assert_eq!(r("SessionToken=a~\nnext"), "SessionToken=<redacted>\nnext");
        assert_eq!(
            r(r#"<a href="x?SessionToken=a~">"#),
            r#"<a href="x?SessionToken=<redacted>">"#
        );
        assert_eq!(r("'x?SessionToken=a~'"), "'x?SessionToken=<redacted>'");
        assert_eq!(r("<x?SessionToken=a~>"), "<x?SessionToken=<redacted>>");
        assert_eq!(r("x?SessionToken=a~"), "x?SessionToken=<redacted>");
    }

    #[test]
    fn multiple_occurrences() {
        let playlist = format!(
            "#EXTM3U\n#EXT-X-MAP:URI=\"getMP4InitFragment.mp4?SessionToken={TOKEN}&TrackNumber=1\"\n\
             #EXTINF:1.01,\ngetMP4MediaFragment.mp4?FragmentNumber=0&SessionToken={TOKEN}&TrackNumber=1\n\
             #EXTINF:0.998,\ngetMP4MediaFragment.mp4?FragmentNumber=1&SessionToken={TOKEN}&TrackNumber=1\n"
        );
        let out = r(&playlist);
        assert!(!out.contains("CiAbC"), "{out}");
        assert_eq!(
            out.matches("SessionToken=<redacted>&TrackNumber=1").count(),
            3
        );
        assert!(out.contains("#EXTINF:0.998,\n"));
    }

    #[test]
    fn percent_encoded_separator() {
        assert_eq!(
            r("next=https%3A%2F%2Fh%2Fp%3FSessionToken%3Dabc~%2B&x=1"),
            "next=https%3A%2F%2Fh%2Fp%3FSessionToken%3D<redacted>&x=1"
        );
    }

    #[test]
    fn json_fields() {
        assert_eq!(
            r(
                r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"wJal/rX+Y=","SessionToken":"IQo~+/="}"#
            ),
            r#"{"AccessKeyId":"ASIAEXAMPLE","SecretAccessKey":"<redacted>","SessionToken":"<redacted>"}"#
        );
        assert_eq!(
            r(r#"{"SessionToken" : "a b \" c", "n": 1}"#),
            r#"{"SessionToken" : "<redacted>", "n": 1}"#
        );
        assert_eq!(
            r(
                r#"{"HLSStreamingSessionURL":"https://h/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=CiA~"}"#
            ),
            r#"{"HLSStreamingSessionURL":"https://h/hls/v1/getHLSMasterPlaylist.m3u8?SessionToken=<redacted>"}"#
        );
    }

    #[test]
    fn escaped_json_as_in_debug_output() {
        assert_eq!(
            r(r#"body: "{\"SessionToken\":\"abc+/=~\",\"x\":1}""#),
            r#"body: "{\"SessionToken\":\"<redacted>\",\"x\":1}""#
        );
    }

    #[test]
    fn environment_and_ini_credentials() {
        assert_eq!(
            r(
                "AWS_ACCESS_KEY_ID=AKIAEXAMPLE AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG+bPxRfiCY= AWS_SESSION_TOKEN=IQoJ~+/= AWS_DEFAULT_REGION=us-west-2"
            ),
            "AWS_ACCESS_KEY_ID=AKIAEXAMPLE AWS_SECRET_ACCESS_KEY=<redacted> AWS_SESSION_TOKEN=<redacted> AWS_DEFAULT_REGION=us-west-2"
        );
        assert_eq!(
            r(
                "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = wJal/rX+Y=\naws_session_token=IQo~\n"
            ),
            "[default]\naws_access_key_id = AKIAEXAMPLE\naws_secret_access_key = <redacted>\naws_session_token=<redacted>\n"
        );
    }

    #[test]
    fn kvssink_properties() {
        assert_eq!(
            r(
                "kvssink stream-name=cam-1 access-key=AKIAEXAMPLE secret-key=wJal/rX+Y= session-token=IQo~"
            ),
            "kvssink stream-name=cam-1 access-key=AKIAEXAMPLE secret-key=<redacted> session-token=<redacted>"
        );
    }

    #[test]
    fn authorization_header() {
        assert_eq!(
            r(
                "Authorization: AWS4-HMAC-SHA256 Credential=AKIA/20240101/us-east-1/kinesisvideo/aws4_request, SignedHeaders=host;x-amz-date, Signature=abc\r\nHost: h\r\n"
            ),
            "Authorization: <redacted>\r\nHost: h\r\n"
        );
        assert_eq!(
            r(r#"{"authorization": "Bearer abc", "host": "h"}"#),
            r#"{"authorization": "<redacted>", "host": "h"}"#
        );
        assert_eq!(
            r("proxy-authorization: Basic dXNlcjpwYXNz"),
            "proxy-authorization: <redacted>"
        );
    }

    #[test]
    fn url_passwords() {
        assert_eq!(
            r("rtsp://admin:hunter2@10.0.0.5:554/Streaming/Channels/101"),
            "rtsp://admin:***@10.0.0.5:554/Streaming/Channels/101"
        );
        assert_eq!(
            r("connecting to rtsps://u:p%40ss~+=@cam.local/live and http://a:b@h:8080?x=1"),
            "connecting to rtsps://u:***@cam.local/live and http://a:***@h:8080?x=1"
        );
        // An unencoded `@` in the password: the last `@` ends the userinfo.
        assert_eq!(r("rtsp://admin:p@ss@cam/x"), "rtsp://admin:***@cam/x");
        // A user without a password, and no userinfo at all, are left alone.
        assert_eq!(r("rtsp://admin@cam/x"), "rtsp://admin@cam/x");
        assert_eq!(r("rtsp://cam:554/x@y"), "rtsp://cam:554/x@y");
        assert_eq!(r("\"rtsp://a:b@c\""), "\"rtsp://a:***@c\"");
    }

    #[test]
    fn both_rules_in_one_text() {
        let text = format!("https://user:pw@h/p.m3u8?SessionToken={TOKEN}&TrackNumber=1");
        assert_eq!(
            r(&text),
            "https://user:***@h/p.m3u8?SessionToken=<redacted>&TrackNumber=1"
        );
    }

    #[test]
    fn idempotent() {
        let inputs = [
            format!("x?SessionToken={TOKEN}&a=1 rtsp://a:b@c/ {{\"SessionToken\":\"t\"}}"),
            "Authorization: Bearer t\n".to_owned(),
            r#"{\"SessionToken\":\"abc\"}"#.to_owned(),
            "aws_secret_access_key = k".to_owned(),
        ];
        for input in inputs {
            let once = r(&input);
            let twice = redact_text(&once);
            assert!(
                matches!(twice, Cow::Borrowed(_)),
                "{once} changed again: {twice}"
            );
        }
    }

    #[test]
    fn no_false_positives() {
        let texts = [
            "Streaming session token is expired",
            "No fragments found in the stream for the streaming request.",
            "missing SessionToken parameter",
            "Authorization failed for stream cam-1",
            "User: arn:aws:iam::123456789012:user/x is not authorized to perform: kinesisvideo:GetDataEndpoint",
            "https://kinesisvideo.us-east-1.amazonaws.com/getDataEndpoint",
            "https://h/hls/v1/getHLSMediaPlaylist.m3u8?TrackNumber=1&FragmentNumber=3",
            "mySessionTokenCount=3 session_tokens=4 authorizations: 2",
            "invalid option `expires`: 12s (must be between 300 s and 43200 s)",
            "time 10:30:00, ratio 1:2, x=y, 50%",
            "email me at user@example.com or see http://host/path/a@b",
            "",
            "ünïcødé: ✓ SessionToken",
        ];
        for text in texts {
            let out = redact_text(text);
            assert!(
                matches!(out, Cow::Borrowed(_)),
                "changed: {text:?} -> {out:?}"
            );
        }
    }

    #[test]
    fn empty_values_are_left_alone() {
        assert!(matches!(
            redact_text("x?SessionToken=&a=1"),
            Cow::Borrowed(_)
        ));
        assert!(matches!(redact_text("rtsp://a:@h/"), Cow::Borrowed(_)));
    }

    #[test]
    fn unicode_around_secrets() {
        assert_eq!(
            r("caméra «x?SessionToken=abc» ✓ rtsp://ü:pässwört@h/"),
            "caméra «x?SessionToken=<redacted> ✓ rtsp://ü:***@h/"
        );
    }

    #[test]
    fn unterminated_quoted_value_is_redacted_to_the_end() {
        assert_eq!(
            r(r#"{"SessionToken":"abc"#),
            r#"{"SessionToken":"<redacted>"#
        );
    }

    mod properties {
        use super::super::*;
        use proptest::prelude::*;

        /// Text around a secret: anything, ending (before) and starting (after) with a
        /// character that is not part of a name or value.
        fn around() -> impl Strategy<Value = (String, String)> {
            (any::<String>(), any::<String>()).prop_map(|(a, b)| (format!("{a} "), format!(" {b}")))
        }

        /// A token made of the characters KVS tokens and percent-encoding use, with a marker
        /// that cannot occur by chance.
        fn token() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop::sample::select(b"ABCDEFabcdef0123456789%~+/=-_.".to_vec()),
                4..40,
            )
            .prop_map(|bytes| format!("QQTOKEN{}", String::from_utf8(bytes).unwrap()))
        }

        proptest! {
            #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

            #[test]
            fn any_text_is_safe_and_idempotent(text in any::<String>()) {
                let once = redact_text(&text).into_owned();
                prop_assert_eq!(redact_text(&once).into_owned(), once.clone());
                let url = redact_url(&text);
                prop_assert_eq!(redact_url(&url), url);
            }

            #[test]
            fn session_tokens_never_survive(
                (before, after) in around(),
                token in token(),
                key in prop::sample::select(vec![
                    "SessionToken=", "sessiontoken=", "SessionToken%3D", "\"SessionToken\": \"",
                    "X-Amz-Security-Token=", "X-Amz-Signature=", "aws_secret_access_key = ",
                    "AWS_SESSION_TOKEN=", "?SessionToken=", "&SessionToken=",
                ]),
            ) {
                let text = format!("{before}{key}{token}{after}");
                let out = redact_text(&text);
                prop_assert!(!out.contains("QQTOKEN"), "{}", out);
            }

            #[test]
            fn url_passwords_never_survive(
                (before, after) in around(),
                scheme in prop::sample::select(vec!["rtsp", "rtsps", "http", "https"]),
                user in "[a-z]{1,8}",
                password in proptest::collection::vec(
                    prop::sample::select(b"ABCabc012!$&'()*+,;=._~-:@%".to_vec()), 1..24),
                path in "(/[a-z0-9]{0,8}){0,3}",
            ) {
                let password = format!("QQPW{}", String::from_utf8(password).unwrap());
                let url = format!("{scheme}://{user}:{password}@10.0.0.5:554{path}");
                prop_assert!(!redact_url(&url).contains("QQPW"), "{}", redact_url(&url));
                let text = format!("{before}{url}{after}");
                prop_assert!(!redact_text(&text).contains("QQPW"), "{}", redact_text(&text));
            }
        }
    }
}
