//! The emulator's own error type: what can go wrong when starting it, configuring streams and
//! injecting faults. (What the emulator answers to clients are KVS errors on the wire, not
//! values of this type.)

use std::fmt;

/// What kind of failure an [`Error`] is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// A builder or stream option is out of range; the message names the option and value.
    InvalidConfig,
    /// The emulator has no stream of that name.
    StreamNotFound,
    /// A stream of that name exists already.
    AlreadyExists,
    /// A GStreamer element is missing or the camera pipeline failed.
    Pipeline,
    /// Binding or serving a socket failed.
    Io,
    /// The emulator's own threads failed (a bug).
    Internal,
}

/// An emulator error: a kind and a message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    invalid_option: Option<String>,
}

/// `Result` with the emulator's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// An error of `kind` with `message`.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
            invalid_option: None,
        }
    }

    /// An [`ErrorKind::InvalidConfig`] error naming the option, its value and why it is refused.
    pub fn invalid_config(option: &str, value: impl fmt::Display, reason: &str) -> Self {
        Self {
            kind: ErrorKind::InvalidConfig,
            message: format!("invalid option `{option}`: {value} ({reason})"),
            invalid_option: Some(option.to_owned()),
        }
    }

    /// The same error with `context` (what was being done) before its message.
    #[must_use]
    pub fn context(mut self, context: impl fmt::Display) -> Self {
        self.message = format!("{context}: {}", self.message);
        self
    }

    /// The kind of failure.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message, without the kind.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// For [`ErrorKind::InvalidConfig`]: the option that was refused.
    pub fn invalid_option(&self) -> Option<&str> {
        self.invalid_option.as_deref()
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

impl From<std::io::Error> for Error {
    fn from(err: std::io::Error) -> Self {
        Self::new(ErrorKind::Io, err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_config_names_the_option_and_value() {
        let err = Error::invalid_config("fps", 0, "must be 1..=120");
        assert_eq!(err.kind(), ErrorKind::InvalidConfig);
        assert_eq!(err.invalid_option(), Some("fps"));
        assert_eq!(err.to_string(), "invalid option `fps`: 0 (must be 1..=120)");
    }
}
