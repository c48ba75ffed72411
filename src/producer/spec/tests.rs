//! Unit tests of the spec module: templates, binary lookup, command lines, option errors.

use super::*;
use crate::ErrorKind;
use std::os::unix::fs::PermissionsExt;

use super::render::render_template;
use super::validate::resolve_kvs_binary;
use std::ffi::OsString;
use std::path::{Path, PathBuf};

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kvs-frames-spec-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn write_exec(path: &Path, mode: u32) {
    std::fs::write(path, "#!/bin/sh\nexit 0\n").unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

#[test]
fn template_placeholders() {
    assert_eq!(
        render_template("--name={stream} {url} {{x}}", "cam-1", "rtsp://h/x").unwrap(),
        "--name=cam-1 rtsp://h/x {x}"
    );
    let err = render_template("{steam}", "cam-1", "rtsp://a:pw@h/").unwrap_err();
    assert_eq!(err.kind(), ErrorKind::InvalidConfig);
    assert_eq!(err.invalid_option(), Some("args"));
    assert!(err.to_string().contains("{steam}"), "{err}");
    assert!(render_template("a } b", "s", "u").is_err());
}

#[test]
fn kvs_binary_path_file_dir_and_path_lookup() {
    let dir = temp_dir("binpath");
    let bin = dir.join("kvs_gstreamer_sample");
    write_exec(&bin, 0o755);
    assert_eq!(
        resolve_kvs_binary(Some(bin.clone().into_os_string()), None).unwrap(),
        bin
    );
    assert_eq!(
        resolve_kvs_binary(Some(dir.clone().into_os_string()), None).unwrap(),
        bin
    );
    let path_var = std::env::join_paths(["/nonexistent", dir.to_str().unwrap()]).unwrap();
    assert_eq!(resolve_kvs_binary(None, Some(&path_var)).unwrap(), bin);

    let err = resolve_kvs_binary(None, Some(&OsString::from("/nonexistent"))).unwrap_err();
    assert_eq!(err.invalid_option(), Some("binary"));
    let err = resolve_kvs_binary(Some(dir.join("missing").into_os_string()), None).unwrap_err();
    assert_eq!(err.invalid_option(), Some(KVS_BINARY_PATH_ENV));
    assert!(err.to_string().contains("no such file"), "{err}");

    let not_exec = dir.join("not-exec");
    write_exec(&not_exec, 0o644);
    let err = resolve_kvs_binary(Some(not_exec.into_os_string()), None).unwrap_err();
    assert!(err.to_string().contains("not an executable"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn sample_command_line_and_working_dir() {
    let dir = temp_dir("sample");
    let build = dir.join("build");
    std::fs::create_dir_all(&build).unwrap();
    std::fs::write(dir.join("kvs_log_configuration"), "").unwrap();
    let bin = build.join("kvs_gstreamer_sample");
    write_exec(&bin, 0o755);
    let spec = ProducerSpec::new(
        "cam-1",
        "rtsp://admin:hunter2@10.0.0.5/live",
        KvsGstreamerSample::new()
            .binary(&bin)
            .aws_region("eu-west-1"),
    );
    let r = spec.render_with(None, None).unwrap();
    assert_eq!(r.program, bin);
    assert_eq!(r.args, ["cam-1", "rtsp://admin:hunter2@10.0.0.5/live"]);
    assert_eq!(r.working_dir.as_deref(), Some(build.as_path()));
    assert!(r.warnings.is_empty(), "{:?}", r.warnings);
    assert!(
        r.env
            .contains(&("AWS_DEFAULT_REGION".into(), "eu-west-1".into()))
    );
    assert_eq!(r.heartbeat_line.as_deref(), Some(DEFAULT_HEARTBEAT_LINE));
    assert!(!r.display().contains("hunter2"));
    assert!(r.display().contains("rtsp://admin:***@10.0.0.5/live"));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn kvssink_command_line() {
    let spec = ProducerSpec::new(
        "cam-1",
        "rtsp://u:p@cam/x",
        GstLaunchKvssink::new()
            .gst_launch("/bin/sh")
            .aws_region("us-east-1")
            .storage_size_mb(256)
            .rtspsrc_property("protocols", "tcp")
            .kvssink_property("retention-period", "24"),
    );
    let r = spec.render_with(None, None).unwrap();
    assert_eq!(
        r.args.join(" "),
        "-e rtspsrc location=rtsp://u:p@cam/x short-header=TRUE protocols=tcp ! rtph264depay \
         ! h264parse ! kvssink stream-name=cam-1 aws-region=us-east-1 storage-size=256 \
         retention-period=24"
    );
    let bad = ProducerSpec::new(
        "cam-1",
        "rtsp://cam/x",
        GstLaunchKvssink::new()
            .gst_launch("/bin/sh")
            .kvssink_property("x ! fakesink", "1"),
    );
    assert_eq!(
        bad.validate().unwrap_err().invalid_option(),
        Some("kvssink_property")
    );
}

#[test]
fn invalid_options_are_named() {
    let ok = || {
        ProducerSpec::new(
            "cam-1",
            "rtsp://cam/x",
            CustomCommand::new("/bin/sh", ["-c", "true"]),
        )
    };
    assert!(ok().validate().is_ok());
    let cases: Vec<(ProducerSpec, &str)> = vec![
        (
            ProducerSpec::new(
                "bad name",
                "rtsp://cam/x",
                CustomCommand::new("/bin/sh", ["x"]),
            ),
            "stream_name",
        ),
        (ok().start_secs(Duration::ZERO), "start_secs"),
        (
            ok().stall_timeout(Some(Duration::from_millis(1))),
            "stall_timeout",
        ),
        (ok().output_lines(0), "output_lines"),
        (ok().env("A=B", "x"), "env"),
        (
            ProducerSpec::new("cam-1", "not a url", CustomCommand::new("/bin/sh", ["x"])),
            "rtsp_url",
        ),
        (
            ProducerSpec::new(
                "cam-1",
                "rtsp://cam/x",
                CustomCommand::new("/nonexistent/prog", ["x"]),
            ),
            "program",
        ),
        (
            ProducerSpec::new(
                "cam-1",
                "http://u:pw@cam/x",
                KvsGstreamerSample::new().binary("/bin/sh"),
            ),
            "rtsp_url",
        ),
        (
            ProducerSpec::new(
                "cam-1",
                "rtsp://cam/x",
                KvsGstreamerSample::new()
                    .binary("/bin/sh")
                    .working_dir("/nonexistent"),
            ),
            "working_dir",
        ),
    ];
    for (spec, option) in cases {
        let err = spec.validate().unwrap_err();
        assert_eq!(err.kind(), ErrorKind::InvalidConfig, "{err}");
        assert_eq!(err.invalid_option(), Some(option), "{err}");
        assert!(!err.to_string().contains("pw@"), "{err}");
    }
}

#[test]
fn url_errors_never_show_the_password() {
    for url in [
        "admin:pw@cam/x",
        "rtsp//admin:pw@cam",
        "ftp://admin:pw@cam/x",
    ] {
        let spec = ProducerSpec::new("c", url, KvsGstreamerSample::new().binary("/bin/sh"));
        let err = spec.validate().unwrap_err();
        assert!(!format!("{err} {err:?}").contains("pw"), "{err:?}");
    }
}
