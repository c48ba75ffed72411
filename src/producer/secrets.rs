//! Redaction for everything the supervisor reports about a producer: on top of
//! [`crate::redact`] (URL passwords, AWS keys, session tokens, signatures), the password forms
//! of camera command lines.
//!
//! # Rules (after those of [`crate::redact::redact_text`])
//!
//! 1. **Secret keys.** A key whose last word is `user-pw`, `password`, `passwd`, `pw`, `secret`
//!    or `token` (ASCII case-insensitive, `-` and `_` interchangeable; the word starts at the
//!    beginning or after a byte that is not a letter or digit, so `camera_password`,
//!    `--rtsp-password`, `MY_TOKEN` and `user-pw` are keys, `NextToken` and `passwords` are not):
//!    - `key=value`, `key: value`, `"key": "value"` (gst-launch properties, `--key=value`
//!      arguments, environment and INI lines, JSON, URL query parameters): the value becomes
//!      `<redacted>`. An unquoted value runs to whitespace, a quote, `&` or `\`; a quoted one to
//!      its closing quote.
//!    - `-key value` / `--key value` (an option followed by its value): the value becomes
//!      `<redacted>`.
//! 2. **Arguments** ([`redact_args`]) are redacted one by one before they are joined: the
//!    argument after a secret option (`--password`, `-token`) and the value of `key=value`
//!    with a secret key are hidden whole, spaces included.
//! 3. **Known values** ([`Secrets`]): the literal password of the camera URL (as written and
//!    percent-decoded), the values of secret environment variables given to the producer or
//!    inherited from the supervisor, and the values of secret properties and arguments are
//!    replaced wherever they appear (values of at least [`MIN_LITERAL`] bytes), whatever the
//!    producer prints around them.
//! 4. **Cut lines** ([`Secrets::redact_cut`]): a line that was cut is redacted as if the cut
//!    were a secret's end: a trailing prefix of a known value is removed, and a URL authority
//!    running to the cut has everything after its first `:` replaced by `***`.

use std::borrow::Cow;

use crate::redact::{REDACTED, REDACTED_PASSWORD, redact_text};

/// The key words whose value is a secret (lower case, `_` standing for `-` or `_`).
pub(crate) const SECRET_WORDS: &[&str] =
    &["user_pw", "password", "passwd", "pw", "secret", "token"];

/// Known values shorter than this are left to the key rules (replacing every `ab` of the
/// output would garble it without protecting much).
pub(crate) const MIN_LITERAL: usize = 4;

fn is_word_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric()
}

/// `key` (lower case, `_` = `-` or `_`) at the start of `bytes`.
fn word_at(bytes: &[u8], word: &str) -> bool {
    let word = word.as_bytes();
    bytes.len() >= word.len()
        && bytes.iter().zip(word).all(|(&b, &w)| {
            if w == b'_' {
                b == b'_' || b == b'-'
            } else {
                b.to_ascii_lowercase() == w
            }
        })
}

/// The secret word starting at `i` (at a word start, not followed by a letter or digit).
fn secret_word_at(bytes: &[u8], i: usize) -> Option<usize> {
    if i > 0 && is_word_byte(bytes[i - 1]) {
        return None;
    }
    SECRET_WORDS
        .iter()
        .filter(|w| word_at(&bytes[i..], w))
        .map(|w| w.len())
        .find(|&len| !bytes.get(i + len).is_some_and(|&b| is_word_byte(b)))
}

/// Whether a whole key (`--rtsp-password`, `user-pw`, `MY_TOKEN`) names a secret: its last
/// word is a secret word.
pub(crate) fn is_secret_key(key: &str) -> bool {
    let bytes = key.as_bytes();
    (0..bytes.len()).any(|i| secret_word_at(bytes, i).is_some_and(|len| i + len == bytes.len()))
}

fn ends_value(b: u8) -> bool {
    b.is_ascii_whitespace() || matches!(b, b'"' | b'\'' | b'&' | b'\\')
}

fn already_redacted(rest: &[u8]) -> bool {
    [REDACTED.as_bytes(), REDACTED_PASSWORD.as_bytes()]
        .iter()
        .any(|r| rest.starts_with(r))
}

/// The secret value after a key ending at `key_end`: `(start, end)` of the bytes to replace.
fn value_after(bytes: &[u8], key_start: usize, key_end: usize) -> Option<(usize, usize)> {
    let mut i = key_end;
    if matches!(bytes.get(i), Some(b'"' | b'\'')) {
        i += 1; // `"password": "…"`
    }
    let blanks = |mut i: usize| {
        while matches!(bytes.get(i), Some(b' ' | b'\t')) {
            i += 1;
        }
        i
    };
    let after_blanks = blanks(i);
    let start = match bytes.get(after_blanks) {
        Some(b'=' | b':') => blanks(after_blanks + 1),
        // `--password value`: an option (its token starts with `-`) and a separate value.
        Some(_) if after_blanks > i && is_option_token(bytes, key_start) => after_blanks,
        _ => return None,
    };
    let rest = bytes.get(start..)?;
    if rest.is_empty() || already_redacted(rest) {
        return None;
    }
    let (start, end) = match rest[0] {
        q @ (b'"' | b'\'') => {
            let content = start + 1;
            let len = bytes[content..].iter().position(|&b| b == q);
            (content, len.map_or(bytes.len(), |n| content + n))
        }
        b'-' if bytes.get(after_blanks) != Some(&b'=')
            && bytes.get(after_blanks) != Some(&b':') =>
        {
            // `--password --other`: no value.
            return None;
        }
        _ => {
            let len = rest.iter().position(|&b| ends_value(b));
            (start, len.map_or(bytes.len(), |n| start + n))
        }
    };
    if end <= start || already_redacted(&bytes[start..]) {
        return None;
    }
    Some((start, end))
}

/// Whether the whitespace-delimited token holding `i` starts with `-`.
fn is_option_token(bytes: &[u8], i: usize) -> bool {
    let token_start = bytes[..i]
        .iter()
        .rposition(|b| b.is_ascii_whitespace() || matches!(b, b'"' | b'\''))
        .map_or(0, |p| p + 1);
    bytes.get(token_start) == Some(&b'-')
}

/// Rule 1 alone. `None` when nothing changed.
fn redact_keys(text: &str) -> Option<String> {
    let bytes = text.as_bytes();
    let mut out: Option<String> = None;
    let mut copied = 0;
    let mut i = 0;
    while i < bytes.len() {
        let Some(len) = is_word_byte(bytes[i])
            .then(|| secret_word_at(bytes, i))
            .flatten()
        else {
            i += 1;
            continue;
        };
        let key_end = i + len;
        match value_after(bytes, i, key_end) {
            Some((start, end)) => {
                let buf = out.get_or_insert_with(|| String::with_capacity(text.len()));
                buf.push_str(&text[copied..start]);
                buf.push_str(REDACTED);
                copied = end;
                i = end.max(key_end);
            }
            None => i = key_end,
        }
    }
    out.map(|mut buf| {
        buf.push_str(&text[copied..]);
        buf
    })
}

/// Rules 1 and [`crate::redact`]'s: URL passwords, AWS keys, session tokens and the secret
/// keys of producer command lines.
#[must_use]
pub(crate) fn redact(text: &str) -> Cow<'_, str> {
    let base = redact_text(text);
    match redact_keys(&base) {
        Some(more) => Cow::Owned(more),
        None => base,
    }
}

/// An option that takes a secret value as the next argument: `--password`, `-token`.
fn is_secret_option(arg: &str) -> bool {
    arg.starts_with('-') && !arg.contains('=') && is_secret_key(arg.trim_start_matches('-'))
}

/// Rule 2: each argument redacted, the value of a secret option or `key=value` hidden whole.
#[must_use]
pub(crate) fn redact_args(args: &[String]) -> Vec<String> {
    let mut out = Vec::with_capacity(args.len());
    let mut hide_next = false;
    for arg in args {
        if std::mem::take(&mut hide_next) && !arg.starts_with('-') {
            out.push(REDACTED.to_owned());
            continue;
        }
        if is_secret_option(arg) {
            hide_next = true;
            out.push(arg.clone());
            continue;
        }
        if let Some((key, _)) = arg.split_once('=')
            && is_secret_key(key.trim_start_matches('-'))
        {
            out.push(format!("{key}={REDACTED}"));
            continue;
        }
        out.push(redact(arg).into_owned());
    }
    out
}

/// The secret values found in arguments (rule 2): the argument after a secret option and the
/// value of a secret `key=value`.
pub(crate) fn secret_arg_values(args: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let mut next = false;
    for arg in args {
        if std::mem::take(&mut next) && !arg.starts_with('-') {
            out.push(arg.clone());
            continue;
        }
        if is_secret_option(arg) {
            next = true;
        } else if let Some((key, value)) = arg.split_once('=')
            && is_secret_key(key.trim_start_matches('-'))
        {
            out.push(value.to_owned());
        }
    }
    out
}

/// Whether an environment variable (or property) name holds a secret: a secret key of rule 1,
/// or one of [`crate::redact`]'s (`AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …).
pub(crate) fn is_secret_name(name: &str) -> bool {
    if is_secret_key(name) {
        return true;
    }
    // Ask the crate's rules whether they would hide the value of `name=`.
    let probe = format!("{name}=x");
    redact_text(&probe) != probe
}

/// The known secret values of one producer (rule 3), and the redaction that uses them.
#[derive(Clone, Default)]
pub(crate) struct Secrets {
    /// Longest first, so that a value containing another is replaced whole.
    literals: Vec<String>,
}

impl std::fmt::Debug for Secrets {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Secrets({} values)", self.literals.len())
    }
}

impl Secrets {
    /// Secrets from these values (short and duplicate ones are dropped).
    pub fn new(values: impl IntoIterator<Item = String>) -> Self {
        let mut literals: Vec<String> = values
            .into_iter()
            .filter(|v| v.len() >= MIN_LITERAL && v.as_str() != REDACTED)
            .collect();
        literals.sort_by(|a, b| b.len().cmp(&a.len()).then_with(|| a.cmp(b)));
        literals.dedup();
        Secrets { literals }
    }

    /// How many values are known.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.literals.len()
    }

    /// Replaces every known value: by `***` between `:` and `@` (a URL password, shown as
    /// the URL rule shows it), else by `<redacted>`.
    fn replace_literals<'a>(&self, text: &'a str) -> Cow<'a, str> {
        let mut out = Cow::Borrowed(text);
        for secret in &self.literals {
            if !out.contains(secret.as_str()) {
                continue;
            }
            let mut replaced = String::with_capacity(out.len());
            let mut rest: &str = &out;
            while let Some(i) = rest.find(secret.as_str()) {
                let after = &rest[i + secret.len()..];
                let in_url = rest[..i].ends_with(':') && after.starts_with('@');
                replaced.push_str(&rest[..i]);
                replaced.push_str(if in_url { REDACTED_PASSWORD } else { REDACTED });
                rest = after;
            }
            replaced.push_str(rest);
            out = Cow::Owned(replaced);
        }
        out
    }

    /// Rules 1 and 3 and [`crate::redact`]'s.
    pub fn redact<'a>(&self, text: &'a str) -> Cow<'a, str> {
        match self.replace_literals(text) {
            Cow::Borrowed(t) => redact(t),
            Cow::Owned(t) => Cow::Owned(redact(&t).into_owned()),
        }
    }

    /// Redacts a line that was cut after `text` (rule 4), then cuts the result to at most
    /// `max_bytes` (on a character boundary).
    pub fn redact_cut(&self, text: &str, was_cut: bool, max_bytes: usize) -> String {
        let mut text = self.replace_literals(text).into_owned();
        if was_cut {
            // A known value cut in its middle: drop the part that made it in.
            let tail = self
                .literals
                .iter()
                .filter_map(|s| {
                    (1..s.len())
                        .rev()
                        .filter(|&n| s.is_char_boundary(n))
                        .find(|&n| text.ends_with(&s[..n]))
                })
                .max();
            if let Some(n) = tail {
                text.truncate(text.len() - n);
            }
            hide_dangling_authority(&mut text);
        }
        let mut out = redact(&text).into_owned();
        if out.len() > max_bytes {
            let cut = (0..=max_bytes)
                .rev()
                .find(|&i| out.is_char_boundary(i))
                .unwrap_or(0);
            out.truncate(cut);
        }
        out
    }
}

/// A URL whose authority runs to the end of `text` (`rtsp://admin:hunt` cut before its `@`):
/// everything after the authority's first `:` may be a password.
fn hide_dangling_authority(text: &mut String) {
    let Some(pos) = text.rfind("://") else {
        return;
    };
    let start = pos + 3;
    let authority = &text[start..];
    let open = !authority.bytes().any(|b| {
        b.is_ascii_whitespace()
            || matches!(b, b'/' | b'?' | b'#' | b'"' | b'\'' | b'<' | b'>' | b'\\')
    });
    if open && let Some(colon) = authority.find(':') {
        text.truncate(start + colon + 1);
        text.push_str(REDACTED_PASSWORD);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r(text: &str) -> String {
        redact(text).into_owned()
    }

    #[test]
    fn secret_keys() {
        for key in [
            "user-pw",
            "user_pw",
            "password",
            "PASSWORD",
            "--password",
            "rtsp-password",
            "camera_passwd",
            "pw",
            "secret",
            "MY_SECRET",
            "token",
            "api-token",
        ] {
            assert!(is_secret_key(key.trim_start_matches('-')), "{key}");
        }
        for key in [
            "location",
            "passwords",
            "NextToken",
            "user-id",
            "secretive",
            "pwd",
        ] {
            assert!(!is_secret_key(key), "{key}");
        }
        assert!(is_secret_name("AWS_SECRET_ACCESS_KEY"));
        assert!(is_secret_name("AWS_SESSION_TOKEN"));
        assert!(is_secret_name("CAMERA_PASSWORD"));
        assert!(!is_secret_name("GST_PLUGIN_PATH"));
        assert!(!is_secret_name("AWS_DEFAULT_REGION"));
    }

    #[test]
    fn key_value_forms() {
        assert_eq!(
            r("user-pw=hunter2 latency=0"),
            "user-pw=<redacted> latency=0"
        );
        assert_eq!(r("--password=hunter2"), "--password=<redacted>");
        assert_eq!(r("--passwd hunter2 --x"), "--passwd <redacted> --x");
        assert_eq!(r("-token abc123 next"), "-token <redacted> next");
        assert_eq!(r("pw: hunter2"), "pw: <redacted>");
        assert_eq!(r(r#"{"secret": "a b c"}"#), r#"{"secret": "<redacted>"}"#);
        assert_eq!(r("CAMERA_PASSWORD=hunter2"), "CAMERA_PASSWORD=<redacted>");
        assert_eq!(
            r("rtsp://cam/live?user=admin&password=hunter2&x=1"),
            "rtsp://cam/live?user=admin&password=<redacted>&x=1"
        );
        assert_eq!(
            r("rtsp://admin:hunter2@cam/live"),
            "rtsp://admin:***@cam/live"
        );
        // Not an option: prose keeps its words.
        assert_eq!(r("password incorrect"), "password incorrect");
        assert_eq!(r("--password --verbose"), "--password --verbose");
        assert_eq!(r("NextToken=abc"), "NextToken=abc");
        // Idempotent.
        for text in ["user-pw=hunter2", "--passwd hunter2", "rtsp://a:b@c/"] {
            let once = r(text);
            assert_eq!(r(&once), once);
        }
    }

    #[test]
    fn arguments() {
        let args: Vec<String> = [
            "--password",
            "two words",
            "--token=a b",
            "user-pw=hunter2",
            "location=rtsp://u:pw12@cam/x",
            "--pw",
            "--next",
            "plain",
        ]
        .map(str::to_owned)
        .to_vec();
        assert_eq!(
            redact_args(&args),
            [
                "--password",
                "<redacted>",
                "--token=<redacted>",
                "user-pw=<redacted>",
                "location=rtsp://u:***@cam/x",
                "--pw",
                "--next",
                "plain"
            ]
        );
        assert_eq!(secret_arg_values(&args), ["two words", "a b", "hunter2"]);
    }

    #[test]
    fn literals_and_cut_lines() {
        let s = Secrets::new(["hunter2".to_owned(), "ab".to_owned(), "hunter2".to_owned()]);
        assert_eq!(s.len(), 1);
        assert_eq!(s.redact("we use hunter2 here"), "we use <redacted> here");
        assert_eq!(
            s.redact("rtsp://a:hunter2@h/ hunter2"),
            "rtsp://a:***@h/ <redacted>"
        );
        assert!(matches!(s.redact("nothing"), Cow::Borrowed(_)));
        // A cut inside a known value.
        assert_eq!(s.redact_cut("xx hunt", true, 100), "xx ");
        // A cut inside a URL's user:password.
        let cut = Secrets::default().redact_cut("open rtsp://admin:hunt", true, 100);
        assert_eq!(cut, "open rtsp://admin:***");
        // A cut after the password, before `@`.
        let cut = Secrets::default().redact_cut("rtsp://admin:hunter2", true, 100);
        assert_eq!(cut, "rtsp://admin:***");
        // Not cut: nothing guessed.
        assert_eq!(
            Secrets::default().redact_cut("rtsp://host:554", false, 100),
            "rtsp://host:554"
        );
        // Redaction first, then the length cut (on a char boundary).
        let long = format!("{}é user-pw=hunter2", "x".repeat(9));
        assert_eq!(s.redact_cut(&long, false, 10), "x".repeat(9));
        assert_eq!(
            s.redact_cut("user-pw=hunter2", false, 100),
            "user-pw=<redacted>"
        );
    }
}
