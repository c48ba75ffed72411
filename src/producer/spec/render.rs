//! Validating a [`ProducerSpec`] and building its command line: [`Rendered`] (program,
//! arguments, environment, the lines to watch for, the secrets to redact).

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::error::{Error, Result};
use crate::producer::naming::validate_stream_name;
use crate::producer::secrets::{self, Secrets, is_secret_name, redact, redact_args};

use super::validate::{check_dir, check_executable, check_property, resolve_kvs_binary};
use super::{
    DEFAULT_HEARTBEAT_LINE, DEFAULT_KVS_SAMPLE_READINESS_LINE, KVS_BINARY_PATH_ENV, MAX_PERIOD,
    MAX_START_STOP, ProducerCommand, ProducerSpec, RtspUrl,
};

/// A fully resolved command line, ready to spawn.
#[derive(Clone)]
pub(crate) struct Rendered {
    pub program: PathBuf,
    pub args: Vec<String>,
    pub working_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub readiness_line: Option<String>,
    pub heartbeat_line: Option<String>,
    /// Warnings worth a health issue (e.g. no log configuration for the sample).
    pub warnings: Vec<String>,
    /// The secret values of this producer (URL password, secret properties, arguments and
    /// environment values), redacted from everything reported about it.
    pub secrets: Secrets,
}

impl Rendered {
    /// The command line with secrets redacted, for logs and status.
    pub fn display(&self) -> String {
        let mut s = self.program.display().to_string();
        for arg in redact_args(&self.args) {
            s.push(' ');
            s.push_str(&arg);
        }
        self.secrets.redact(&s).into_owned()
    }

    /// Gathers the secrets of the rendered command, its environment and the supervisor's
    /// own environment (inherited by the child).
    fn with_secrets(mut self, url: &RtspUrl) -> Self {
        let mut values = url.secret_values();
        values.extend(secrets::secret_arg_values(&self.args));
        values.extend(
            self.env
                .iter()
                .filter(|(k, _)| is_secret_name(k))
                .map(|(_, v)| v.clone()),
        );
        values.extend(
            std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| is_secret_name(k))
                .map(|(_, v)| v),
        );
        self.secrets = Secrets::new(values);
        self
    }
}

impl ProducerSpec {
    pub(crate) fn render(&self) -> Result<Rendered> {
        self.render_with(
            std::env::var_os(KVS_BINARY_PATH_ENV),
            std::env::var_os("PATH"),
        )
    }

    /// Validates and renders with the given `$KVS_BINARY_PATH` and `$PATH` (injected for
    /// tests).
    pub(crate) fn render_with(
        &self,
        kvs_binary_path: Option<OsString>,
        path_var: Option<OsString>,
    ) -> Result<Rendered> {
        validate_stream_name(&self.stream_name)?;
        let min = Duration::from_millis(100);
        if !(min..=MAX_START_STOP).contains(&self.start_secs) {
            return Err(Error::invalid_config(
                "start_secs",
                format!("{:?}", self.start_secs),
                "must be between 100 ms and 1 h",
            ));
        }
        if let Some(stall) = self.stall_timeout
            && !(min..=MAX_PERIOD).contains(&stall)
        {
            return Err(Error::invalid_config(
                "stall_timeout",
                format!("{stall:?}"),
                "must be between 100 ms and 24 h (or None to disable the watchdog)",
            ));
        }
        if self.stop_timeout > MAX_START_STOP {
            return Err(Error::invalid_config(
                "stop_timeout",
                format!("{:?}", self.stop_timeout),
                "must be at most 1 h",
            ));
        }
        if !(1..=100_000).contains(&self.output_lines) {
            return Err(Error::invalid_config(
                "output_lines",
                self.output_lines,
                "must be between 1 and 100000",
            ));
        }
        for (name, _) in &self.env {
            if name.is_empty() || name.contains('=') || name.contains('\0') {
                return Err(Error::invalid_config(
                    "env",
                    format!("{name:?}"),
                    "a variable name must be non-empty without `=` or NUL",
                ));
            }
        }
        self.restart.validate()?;
        let stream = self.stream_name.as_str();
        let url = self.rtsp_url.expose();
        match &self.command {
            ProducerCommand::KvsGstreamerSample(c) => {
                self.rtsp_url.validate(true)?;
                let program = match &c.binary {
                    Some(path) => check_executable("binary", path, path_var.as_ref())?,
                    None => resolve_kvs_binary(kvs_binary_path, path_var.as_ref())?,
                };
                let working_dir = match &c.working_dir {
                    Some(dir) => dir.clone(),
                    None => program
                        .parent()
                        .map_or_else(|| PathBuf::from("."), Path::to_path_buf),
                };
                check_dir("working_dir", &working_dir)?;
                let mut warnings = Vec::new();
                if !working_dir.join("../kvs_log_configuration").is_file() {
                    warnings.push(format!(
                        "{} has no ../kvs_log_configuration: the sample logs with its defaults, \
                         and the heartbeat line may never appear",
                        working_dir.display()
                    ));
                }
                let mut env = Vec::new();
                if let Some(region) = &c.aws_region {
                    env.push(("AWS_DEFAULT_REGION".to_owned(), region.clone()));
                }
                env.extend(self.env.iter().cloned());
                Ok(Rendered {
                    program,
                    args: vec![stream.to_owned(), url.to_owned()],
                    working_dir: Some(working_dir),
                    env,
                    readiness_line: c
                        .readiness_line
                        .clone()
                        .unwrap_or_else(|| Some(DEFAULT_KVS_SAMPLE_READINESS_LINE.to_owned())),
                    heartbeat_line: c
                        .heartbeat_line
                        .clone()
                        .unwrap_or_else(|| Some(DEFAULT_HEARTBEAT_LINE.to_owned())),
                    warnings,
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
            ProducerCommand::GstLaunchKvssink(c) => {
                self.rtsp_url.validate(true)?;
                let program = check_executable("gst_launch", &c.gst_launch, path_var.as_ref())?;
                let mut args = vec![
                    "-e".to_owned(),
                    "rtspsrc".to_owned(),
                    format!("location={url}"),
                    "short-header=TRUE".to_owned(),
                ];
                for (name, value) in &c.rtspsrc_properties {
                    check_property("rtspsrc_property", name, value)?;
                    args.push(format!("{name}={value}"));
                }
                args.extend(
                    ["!", "rtph264depay", "!", "h264parse", "!", "kvssink"].map(str::to_owned),
                );
                args.push(format!("stream-name={stream}"));
                if let Some(region) = &c.aws_region {
                    check_property("aws_region", "aws-region", region)?;
                    args.push(format!("aws-region={region}"));
                }
                if let Some(mb) = c.storage_size_mb {
                    if mb == 0 {
                        return Err(Error::invalid_config(
                            "storage_size_mb",
                            mb,
                            "must be at least 1",
                        ));
                    }
                    args.push(format!("storage-size={mb}"));
                }
                for (name, value) in &c.kvssink_properties {
                    check_property("kvssink_property", name, value)?;
                    args.push(format!("{name}={value}"));
                }
                Ok(Rendered {
                    program,
                    args,
                    working_dir: None,
                    env: self.env.clone(),
                    readiness_line: c.readiness_line.clone(),
                    heartbeat_line: c.heartbeat_line.clone(),
                    warnings: Vec::new(),
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
            ProducerCommand::Custom(c) => {
                self.rtsp_url.validate(false)?;
                let program = check_executable("program", &c.program, path_var.as_ref())?;
                if let Some(dir) = &c.working_dir {
                    check_dir("working_dir", dir)?;
                }
                let args = c
                    .args
                    .iter()
                    .map(|a| render_template(a, stream, url))
                    .collect::<Result<Vec<_>>>()?;
                Ok(Rendered {
                    program,
                    args,
                    working_dir: c.working_dir.clone(),
                    env: self.env.clone(),
                    readiness_line: c.readiness_line.clone(),
                    heartbeat_line: c.heartbeat_line.clone(),
                    warnings: Vec::new(),
                    secrets: Secrets::default(),
                }
                .with_secrets(&self.rtsp_url))
            }
        }
    }
}

/// Replaces `{stream}` and `{url}`; `{{`/`}}` are literal braces.
pub(crate) fn render_template(template: &str, stream: &str, url: &str) -> Result<String> {
    let mut out = String::with_capacity(template.len() + url.len());
    let mut rest = template;
    while let Some(i) = rest.find(['{', '}']) {
        out.push_str(&rest[..i]);
        let tail = &rest[i..];
        if let Some(after) = tail.strip_prefix("{{") {
            out.push('{');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("}}") {
            out.push('}');
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{stream}") {
            out.push_str(stream);
            rest = after;
        } else if let Some(after) = tail.strip_prefix("{url}") {
            out.push_str(url);
            rest = after;
        } else {
            let shown: String = redact(tail).chars().take(20).collect();
            return Err(Error::invalid_config(
                "args",
                format!("{:?}", redact_args(&[template.to_owned()])[0]),
                &format!(
                    "unknown placeholder or lone brace at {shown:?}: use {{stream}}, {{url}}, {{{{ or }}}}"
                ),
            ));
        }
    }
    out.push_str(rest);
    Ok(out)
}
