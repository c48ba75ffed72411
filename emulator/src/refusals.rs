//! API operations the emulator refuses, as an account whose IAM policy lacks them would (or an
//! endpoint that does not know them).

use std::collections::HashMap;
use std::fmt;

use axum::http::StatusCode;
use parking_lot::Mutex;

use crate::error::{Error, ErrorKind, Result};
use crate::http::KvsError;

/// The API operations the emulator serves (the names [`Refusal`]s apply to).
pub const OPERATIONS: &[&str] = &[
    "CreateStream",
    "DeleteStream",
    "DescribeStream",
    "GetClip",
    "GetDataEndpoint",
    "GetHLSStreamingSessionURL",
    "GetMedia",
    "ListFragments",
    "ListStreams",
];

/// How a refused API operation answers (see [`EmulatorBuilder::refuse_api`](crate::EmulatorBuilder::refuse_api)).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Refusal {
    /// HTTP 403 `AccessDeniedException` "User … is not authorized to perform:
    /// kinesisvideo:OPERATION …": what KVS answers when the caller's IAM policy does not allow
    /// the operation.
    AccessDenied,
    /// HTTP 404 `UnknownOperationException`: what an endpoint that does not implement the
    /// operation answers (some KVS imitations lack `ListFragments`).
    UnknownOperation,
}

impl Refusal {
    /// Parses `403`/`access-denied` or `404`/`unknown` (the program's `--refuse-api NAME:HOW`).
    pub fn parse(text: &str) -> Option<Refusal> {
        match text.trim().to_ascii_lowercase().as_str() {
            "403" | "access-denied" | "accessdenied" => Some(Refusal::AccessDenied),
            "404" | "unknown" | "unknown-operation" => Some(Refusal::UnknownOperation),
            _ => None,
        }
    }

    fn error(self, operation: &str) -> KvsError {
        match self {
            Refusal::AccessDenied => KvsError::new(
                StatusCode::FORBIDDEN,
                "AccessDeniedException",
                format!(
                    "User: arn:aws:iam::{}:user/emulator is not authorized to perform: \
                     kinesisvideo:{operation} because no identity-based policy allows the \
                     kinesisvideo:{operation} action",
                    crate::ACCOUNT_ID
                ),
            ),
            Refusal::UnknownOperation => KvsError::new(
                StatusCode::NOT_FOUND,
                "UnknownOperationException",
                format!("Unknown operation /{}", lower_first(operation)),
            ),
        }
    }
}

impl fmt::Display for Refusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Refusal::AccessDenied => "403 AccessDeniedException",
            Refusal::UnknownOperation => "404 UnknownOperationException",
        })
    }
}

fn lower_first(s: &str) -> String {
    let mut chars = s.chars();
    chars.next().map_or_else(String::new, |c| {
        c.to_ascii_lowercase().to_string() + chars.as_str()
    })
}

/// The refused operations of one emulator.
#[derive(Debug, Default)]
pub(crate) struct Refusals(Mutex<HashMap<&'static str, Refusal>>);

impl Refusals {
    /// Refuses `operation` (`None`: serves it again); an unknown name is an error.
    pub(crate) fn set(&self, operation: &str, refusal: Option<Refusal>) -> Result<()> {
        let name = known(operation)?;
        let mut map = self.0.lock();
        match refusal {
            Some(refusal) => map.insert(name, refusal),
            None => map.remove(name),
        };
        Ok(())
    }

    /// The error `operation` answers with, if it is refused.
    pub(crate) fn check(&self, operation: &str) -> std::result::Result<(), KvsError> {
        match self.0.lock().get(operation) {
            Some(refusal) => Err(refusal.error(operation)),
            None => Ok(()),
        }
    }
}

/// `operation` as one of [`OPERATIONS`].
pub(crate) fn known(operation: &str) -> Result<&'static str> {
    OPERATIONS
        .iter()
        .copied()
        .find(|&op| op == operation)
        .ok_or_else(|| {
            Error::new(
                ErrorKind::InvalidConfig,
                format!(
                    "unknown API operation {operation:?}: one of {}",
                    OPERATIONS.join(", ")
                ),
            )
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_answer_like_kvs_and_unknown_names_are_errors() {
        let r = Refusals::default();
        assert!(r.check("ListFragments").is_ok());
        r.set("ListFragments", Some(Refusal::AccessDenied)).unwrap();
        let e = r.check("ListFragments").unwrap_err();
        assert_eq!((e.status.as_u16(), e.code), (403, "AccessDeniedException"));
        assert!(
            e.message.contains("kinesisvideo:ListFragments"),
            "{}",
            e.message
        );
        assert!(r.check("GetClip").is_ok());
        r.set("ListFragments", Some(Refusal::UnknownOperation))
            .unwrap();
        let e = r.check("ListFragments").unwrap_err();
        assert_eq!(
            (e.status.as_u16(), e.code),
            (404, "UnknownOperationException")
        );
        assert_eq!(e.message, "Unknown operation /listFragments");
        r.set("ListFragments", None).unwrap();
        assert!(r.check("ListFragments").is_ok());
        let err = r
            .set("ListFragment", Some(Refusal::AccessDenied))
            .unwrap_err();
        assert!(err.to_string().contains("\"ListFragment\""), "{err}");
        assert_eq!(Refusal::parse("404"), Some(Refusal::UnknownOperation));
        assert_eq!(Refusal::parse("Access-Denied"), Some(Refusal::AccessDenied));
        assert_eq!(Refusal::parse("500"), None);
    }
}
