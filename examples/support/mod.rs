//! Shared by the examples (included with `#[path = "support/mod.rs"] mod support;`).

use std::io::IsTerminal;

/// Whether log lines written to `stream` may carry ANSI colours: only on a terminal, and never
/// when `NO_COLOR` is set to anything but the empty string (<https://no-color.org>).
pub fn colour(stream: &impl IsTerminal) -> bool {
    stream.is_terminal() && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}
