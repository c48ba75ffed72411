//! Checks of what a command line is built from: programs (as paths or in `PATH`, and the
//! `kvs_gstreamer_sample` binary), working directories and GStreamer properties.

use std::ffi::OsString;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};
use crate::producer::secrets::{is_secret_name, redact};

use super::KVS_BINARY_PATH_ENV;

pub(super) fn check_property(option: &str, name: &str, value: &str) -> Result<()> {
    let name_ok = !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_');
    if !name_ok {
        return Err(Error::invalid_config(
            option,
            format!("{name:?}"),
            "a property name is ASCII letters, digits, `-` and `_`",
        ));
    }
    if value.is_empty() || value.contains('\0') {
        let shown = if is_secret_name(name) {
            format!("{name}=<redacted>")
        } else {
            redact(&format!("{name}={value:?}")).into_owned()
        };
        return Err(Error::invalid_config(
            option,
            shown,
            "a property value must be non-empty without NUL",
        ));
    }
    Ok(())
}

pub(super) fn check_dir(option: &str, dir: &Path) -> Result<()> {
    if dir.is_dir() {
        Ok(())
    } else {
        Err(Error::invalid_config(
            option,
            dir.display(),
            "not an existing directory",
        ))
    }
}

fn is_executable_file(path: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    path.metadata()
        .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// A program path: checked as is when it contains a `/`, else looked up in `path_var`.
pub(super) fn check_executable(
    option: &str,
    program: &Path,
    path_var: Option<&OsString>,
) -> Result<PathBuf> {
    if program.as_os_str().is_empty() {
        return Err(Error::invalid_config(option, "\"\"", "empty program path"));
    }
    if program.components().count() > 1 || program.is_absolute() {
        if !program.exists() {
            return Err(Error::invalid_config(
                option,
                program.display(),
                "no such file",
            ));
        }
        if !is_executable_file(program) {
            return Err(Error::invalid_config(
                option,
                program.display(),
                "not an executable file",
            ));
        }
        return Ok(program.to_path_buf());
    }
    let found = path_var.and_then(|paths| {
        std::env::split_paths(paths)
            .map(|dir| dir.join(program))
            .find(|candidate| is_executable_file(candidate))
    });
    found.ok_or_else(|| {
        Error::invalid_config(
            option,
            program.display(),
            "not found as an executable in PATH",
        )
    })
}

/// `$KVS_BINARY_PATH` (a file, or a directory holding `kvs_gstreamer_sample`), else
/// `kvs_gstreamer_sample` in `PATH`.
pub(crate) fn resolve_kvs_binary(
    kvs_binary_path: Option<OsString>,
    path_var: Option<&OsString>,
) -> Result<PathBuf> {
    const NAME: &str = "kvs_gstreamer_sample";
    match kvs_binary_path.filter(|v| !v.is_empty()) {
        Some(value) => {
            let path = PathBuf::from(value);
            let candidate = if path.is_dir() { path.join(NAME) } else { path };
            if !candidate.exists() {
                return Err(Error::invalid_config(
                    KVS_BINARY_PATH_ENV,
                    candidate.display(),
                    "no such file",
                ));
            }
            if !is_executable_file(&candidate) {
                return Err(Error::invalid_config(
                    KVS_BINARY_PATH_ENV,
                    candidate.display(),
                    "not an executable file",
                ));
            }
            Ok(candidate)
        }
        None => check_executable("binary", Path::new(NAME), path_var).map_err(|_| {
            Error::invalid_config(
                "binary",
                NAME,
                "not found in PATH; set the binary or $KVS_BINARY_PATH",
            )
        }),
    }
}
